"""pocketgpt model: GPT network, tokenizer, KV cache, sampling and checkpoints."""
