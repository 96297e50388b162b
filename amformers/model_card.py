"""The model card (`README.md`) of a saved model: one owner for its text.

The card is rendered from the template `model_cards/model_card_template.md` (package data of
`amformers.model_cards`, read with `importlib.resources`, so it works the same from a checkout and from an
installed package) by `huggingface_hub.ModelCard`, with the YAML front matter (license, language, datasets, tags and
a model-index entry for the validation perplexity) from `ModelCardData`. The pretraining export
(`amformers.train.export`) calls `write_model_card` with what the run knows; the template keeps a marked block for the
evaluation results, which the evaluation section of this module fills.

This module needs only the package's core dependencies (huggingface_hub), so `amformers.train` and
`amformers.eval` may both import it.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

MODEL_CARD_TEMPLATE = "model_card_template.md"  # in the package `amformers.model_cards`


def model_card_template() -> str:
    """The text of the shipped model-card template (a Jinja template for `huggingface_hub.ModelCard`)."""
    return resources.files("amformers.model_cards").joinpath(MODEL_CARD_TEMPLATE).read_text(encoding="utf-8")


def write_model_card(folder: str | Path, config: dict, context: dict, repo_id: str | None = None) -> Path:
    """Render the card of the model saved in `folder` into `folder/README.md`; its path.

    `config` is a loaded pretraining config (`amformers.train.config.load_config`: its `card` section gives the
    license, language, datasets and tags, `model_type` and `description` the headline); `context` holds what the
    template shows (parameters, steps, tokens_seen, val_loss, training, samples, ...; see
    `amformers.train.export.card_context`). `repo_id` names the Hub repository in the card's code example.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    card = config["card"]
    eval_results = None
    if context.get("val_loss") is not None:
        eval_results = [
            EvalResult(
                task_type="text-generation",
                task_name="Causal language modeling",
                dataset_type=card.get("eval_dataset_type", "held-out-pretraining-split"),
                dataset_name="held-out validation split of the pretraining mix",
                dataset_split="validation",
                metric_type="perplexity",
                metric_name="Validation perplexity",
                metric_value=round(math.exp(context["val_loss"]), 4),
            )
        ]
    card_data = ModelCardData(
        language=card["language"],
        license=card["license"],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys([*card["tags"], config["model_type"]])),
        datasets=card["datasets"] or None,
        model_name=repo_id or folder.name,
        eval_results=eval_results,
    )
    kwargs = {
        "repo_id": repo_id or str(folder),
        "model_name": repo_id.split("/")[-1] if repo_id else folder.name,
        "description": config["description"],
        **context,
    }
    model_card = ModelCard.from_template(card_data, template_str=model_card_template(), **kwargs)
    path = folder / "README.md"
    model_card.save(str(path))
    return path
