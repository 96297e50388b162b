"""Evaluations of amformers models (they use `amformers.modeling`, never the reverse)."""
