"""infermesh: the client-side package (CLI, generated gRPC stubs under infermesh/<service>/v1/)."""

__version__ = "0.1.0"
