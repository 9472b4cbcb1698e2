"""The router's pure core: plain values and policies, no grpc, asyncio or protobuf (mypy --strict)."""
