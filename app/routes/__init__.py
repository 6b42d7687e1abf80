"""HTTP routes: generate (native API), openai (compatible API), health (operations)."""
