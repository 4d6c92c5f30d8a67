"""agentrun: the protobuf contract's Python stubs, the client library and the CLI."""
