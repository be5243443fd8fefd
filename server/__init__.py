"""Lingua Scheduler server: gRPC servicers over the Redis job store."""
