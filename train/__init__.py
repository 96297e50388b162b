"""Pretraining and fine-tuning entry points (they use `amformers.modeling`, never the reverse)."""
