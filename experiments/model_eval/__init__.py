"""Evaluation of the shipped checkpoints: `results/<model>/<suite>.json` (amformers.eval.results schema) and
the model comparison section of the report (`report.py`)."""
