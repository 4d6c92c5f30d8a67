"""The agentrun worker service: the agent-run workflow and the activities it drives.

The gRPC server imports the run contract from here (workflow types, agent
configuration, the Redis layout of run event streams), so both services always
agree on it.
"""
