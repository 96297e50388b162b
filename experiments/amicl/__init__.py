"""AMICL: the associative-memory in-context-learning notebook reproduced without training (`run.py`)."""
