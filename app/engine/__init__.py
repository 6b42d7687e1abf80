"""The inference engine: one decode thread running continuous batching over a slot KV cache."""
