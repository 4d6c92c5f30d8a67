"""What the gRPC server and the worker service share, so that neither imports the other.

- ``contract``: the types that cross the Temporal boundary (workflow and activity inputs and outputs, memo keys,
  states, decisions and error types). It imports no client library, so the server can start workflows without
  loading the worker.
- ``events``: the one place that builds ``agentrun.v1.RunEvent`` messages.
- ``agents``: the agents file; ``settings``: the process settings.
- ``run_stream`` and ``conversations``: the Redis layouts of run event streams and conversation history.
"""
