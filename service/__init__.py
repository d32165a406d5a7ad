"""The online side: gRPC servicer, batching, hot swap, health, metrics and the client."""
