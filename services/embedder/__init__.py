"""The embedder service: sentence embeddings with dynamic batching, over gRPC."""
