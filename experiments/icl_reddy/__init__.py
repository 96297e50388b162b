"""Reddy (2023) in-context classification with a two-layer attention-only network (`run.py`)."""
