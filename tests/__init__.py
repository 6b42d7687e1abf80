"""pocketgpt test suite."""
