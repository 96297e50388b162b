"""Package data: the model-card template that `amformers.model_card` renders (read with importlib.resources)."""
