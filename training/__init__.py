"""pocketgpt training: data preparation, training loop and evaluation.

Run it as `python -m pocketgpt.training {train,prepare,eval} ...` or `pocketgpt train ...` (see training.cli). With no
`--data`, it trains on `stdlib`: the running interpreter's standard library sources (see training.sources).
training.config (the job schema) and training.metrics (the metrics.jsonl contract) import no torch.
"""
