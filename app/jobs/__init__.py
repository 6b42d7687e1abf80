"""Training jobs and datasets for the admin API: SQLite store, process manager, uploads, checkpoint listing.

Nothing here imports training internals: a job is a separate `python -m pocketgpt.training train ...` process, and the
only things read back from it are its log file, its `metrics.jsonl` and its checkpoint directories.
"""
