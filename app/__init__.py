"""pocketgpt web service: FastAPI app, CLI entry point and static UI."""
