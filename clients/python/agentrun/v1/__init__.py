"""Generated stubs of the agentrun.v1 protobuf package (see clients/python/generate.py)."""
