"""The agentrun worker service: the agent-run workflow, the activities it drives, and the tools.

Nothing here is imported by the gRPC server; what both services need is in ``shared``.
"""
