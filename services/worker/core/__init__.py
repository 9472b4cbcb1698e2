"""The worker's pure scheduling core: KV block manager and iteration-level scheduler (no torch)."""
