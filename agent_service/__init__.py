"""The agentrun gRPC server: validates requests and fronts Temporal and the runs' Redis streams."""
