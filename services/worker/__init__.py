"""The generation worker: a Llama-family model on one device, streaming tokens over gRPC."""
