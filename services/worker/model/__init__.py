"""The torch side of the worker: Llama-family model, weight loading, KV cache."""
