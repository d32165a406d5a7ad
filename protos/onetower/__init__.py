"""Generated gRPC stubs for the onetower contract."""
