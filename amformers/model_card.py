"""The model card (`README.md`) of a saved model and its evaluation record: one owner for both.

Training side (top of this file): the card is rendered from the template `model_cards/model_card_template.md`
(package data of `amformers.model_cards`, read with `importlib.resources`, so it works the same from a checkout and
from an installed package) by `huggingface_hub.ModelCard`, with the YAML front matter (license, language, datasets,
tags and a model-index entry for the validation perplexity) from `ModelCardData`. The pretraining export
(`amformers.train.export`) calls `write_model_card` with what the run knows; the template keeps a marked block for
the evaluation results.

Evaluation side (the section at the end): from the suites' result files (`amformers.eval.results`, the result
schema; standard library only) it writes each checkpoint's `eval_results.json` (the headline numbers flat, the
commands that produced them, the settings that recompute the TinyStories perplexity), the card's `model-index`
(huggingface_hub EvalResult entries; the card's other metadata and results stay), and the card text between the
eval-results markers (inserted before "## Sample generations" when the markers are missing). Running it twice
changes nothing.

    python -m amformers.model_card --results experiments/model_eval/results --checkpoints checkpoints/

    python -m amformers.model_card --render checkpoints/*/     # re-render cards from each folder's files first

Both `amformers.train` and `amformers.eval` may import this module; it needs only the package's core dependencies
(`--render` imports `amformers.train.export`, which reads the folder the way the pretraining export writes it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
from importlib import resources
from pathlib import Path

from .eval.results import IOI_HEADLINE_SET, METRICS, format_table, read_results

# ---------------------------------------------------------------------------------------------------------------
# Training: the card from the template.
# ---------------------------------------------------------------------------------------------------------------

MODEL_CARD_TEMPLATE = "model_card_template.md"  # in the package `amformers.model_cards`

# The transformers releases the test suite runs on, as the project states them: `requirements/lock.txt` pins the
# low end of pyproject.toml's range (`make test`), and `make test-newest` upgrades to the newest release the
# registry serves (README, "Quick start"). Cards show these; tests/test_cli.py checks the low end against the lock.
TESTED_TRANSFORMERS = {"oldest": "5.23.0", "newest": "5.24.0"}

_ATTN_STREAM_PAPER = ("Burns, Fukai & Earls", "2412.15113")
_PALIMPSA_PAPER = ("Bonnet et al.", "2602.09075")


def model_family(model_type: str, fields: dict) -> dict:
    """The plain-words identity of a model for its card: {name, summary, paper, arxiv}."""
    if model_type == "attn_stream":
        if str(fields.get("attention_stream", "values")).lower() in ("none", "false", "off"):
            summary = (
                "the AttnStream transformer with its attention residual stream turned off, i.e. a plain Llama-style "
                "decoder-only transformer: the baseline its stream variants are compared against"
            )
            return {"name": "AttnStream baseline", "summary": summary, "paper": _ATTN_STREAM_PAPER}
        stream = fields.get("attention_stream", "values")
        stream = {"values": "value", "keys": "key", "queries": "query"}.get(stream, stream)
        summary = (
            f"a Llama-style decoder-only transformer in which each attention head also receives the raw {stream} "
            "projection of the same head in the previous layer (an attention residual stream, inspired by "
            "associative memory)"
        )
        return {"name": "AttnStream", "summary": summary, "paper": _ATTN_STREAM_PAPER}
    if model_type == "palimpsa":
        if not fields.get("metaplastic", True):
            summary = (
                "Palimpsa's twin without metaplasticity: the importance state stays at its prior, so each layer is "
                "plain gated linear attention (a recurrent model with a fixed-size memory); the ablation Palimpsa is "
                "compared against"
            )
            return {"name": "NotPalimpsa", "summary": summary, "paper": _PALIMPSA_PAPER}
        summary = (
            "a recurrent language model whose layers are metaplastic gated linear attention: a fixed-size "
            "associative memory per head, paired with an importance state that makes well-used memories harder to "
            "overwrite"
        )
        return {"name": "Palimpsa", "summary": summary, "paper": _PALIMPSA_PAPER}
    return {"name": model_type, "summary": f"an amformers `{model_type}` model", "paper": None}


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
        "family": model_family(config["model_type"], config.get("model") or {}),
        "tested_transformers": TESTED_TRANSFORMERS,
        **context,
    }
    model_card = ModelCard.from_template(card_data, template_str=model_card_template(), **kwargs)
    path = folder / "README.md"
    model_card.save(str(path))
    return path


# ---------------------------------------------------------------------------------------------------------------
# Evaluation results: eval_results.json, the model-index and the card's results block.
# ---------------------------------------------------------------------------------------------------------------

CARD_BEGIN = "<!-- eval-results:begin -->"
CARD_END = "<!-- eval-results:end -->"
CARD_RESULTS_FILE = "eval_results.json"
CARDS_COMMAND = "python -m amformers.model_card --results <results folder> --checkpoints <checkpoints folder>"

_IOI_WANG = (
    "Indirect object identification",
    f"amformers/ioi-{IOI_HEADLINE_SET}",
    "IOI, Wang et al. 2022 templates with TinyStories names",
    "test",
)
_TINYSTORIES = ("Causal language modeling", "roneneldan/TinyStories", "TinyStories validation stories", "validation")
# Model-index entry per metric name: (task name, dataset type, dataset name, split, metric type, metric name).
CARD_ENTRIES = {
    "tinystories_valid_perplexity": (*_TINYSTORIES, "perplexity", "Perplexity"),
    "tinystories_valid_bits_per_byte": (*_TINYSTORIES, "bits_per_byte", "Bits per byte"),
    "heldout_books_bits_per_byte": ("Causal language modeling", "amformers/pd-stories-holdout",
                                    "Held-out public-domain book chunks", "validation", "bits_per_byte",
                                    "Bits per byte"),
    "ioi_accuracy": (*_IOI_WANG, "accuracy", "IOI accuracy"),
    "ioi_mean_logit_diff": (*_IOI_WANG, "logit_difference", "Mean logit difference (IO - S)"),
    "ioi_official_mean_p_io": ("Indirect object identification", "amformers/ioi-official",
                               "IOI, Burns et al. prompts", "test", "mean_p_io", "Mean P(IO)"),
    "blimp_accuracy": ("Linguistic minimal pairs", "nyu-mll/blimp", "BLiMP", None, "accuracy", "Accuracy"),
    "babi_mean_accuracy": ("Question answering", "facebook/babi_qa", "bAbI en-10k test, zero-shot ranking", "test",
                           "accuracy", "Mean accuracy over tasks"),
    **{
        f"lm_eval_{task}_{metric}": ("lm-eval task", f"amformers/{task}", f"lm-eval {task}", "test", metric,
                                     f"{task} {metric}")
        for task, metric in (("amformers_blimp", "acc"), ("amformers_ioi", "acc"),
                             ("amformers_tinystories_cloze", "acc"), ("amformers_tinystories_cloze", "perplexity"))
    },
}  # fmt: skip


def _load_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def training_summary(records: dict[str, dict], checkpoint: str | Path | None = None) -> dict | None:
    """training_summary.json of the model folder the results were computed on, else of `checkpoint`, if present."""
    folders = [Path(r["provenance"]["model_dir"]) for r in records.values() if r["provenance"].get("model_dir")]
    folders += [Path(checkpoint)] if checkpoint is not None else []
    for folder in folders:
        summary = _load_json(folder / "training_summary.json")
        if summary:
            return summary
    return None


def headline_metrics(records: dict[str, dict], checkpoint: str | Path | None = None) -> dict:
    """{metric name: value} of one model's results ({suite: record}): the headline metrics, in METRICS order."""
    found = {name: value for record in records.values() for name, value in record["metrics"].items()}
    summary = training_summary(records, checkpoint)
    if summary and summary.get("tokens") is not None:
        found["training_tokens"] = summary["tokens"]
    return {name: found[name] for name, metric in METRICS.items() if metric.headline and found.get(name) is not None}


def suite_limits(records: dict[str, dict]) -> dict:
    """{suite: the --limit it ran with (None: every example)}, from each result's settings."""
    limits = {}
    for suite, record in records.items():
        keys = [k for k in record["settings"] if k == "limit" or k.startswith("limit_")]
        if keys:
            limits[suite] = next((record["settings"][k] for k in keys if record["settings"][k] is not None), None)
    return limits


def model_tables(records: dict[str, dict]) -> list[str]:
    """The markdown tables of one model's results (the card block and the report's per-model section)."""
    lines = []

    def table(suite: str, name: str, columns: list[str]) -> list[dict]:
        return [{c: row.get(c) for c in columns} for row in records[suite]["tables"][name]]

    if "perplexity" in records:
        rows = table("perplexity", "sources", ["source", "documents", "tokens", "perplexity", "bits_per_byte"])
        lines += ["Perplexity:", "", format_table(rows), ""]
    if "ioi" in records:
        rows = table("ioi", "sets", ["set", "n", "accuracy", "mean_p_io", "mean_logit_diff"])
        lines += ["IOI:", "", format_table(rows), ""]
    if "blimp" in records:
        metrics = records["blimp"]["metrics"]
        rows = [{"phenomenon": "all", "accuracy": metrics["blimp_accuracy"]}]
        rows += table("blimp", "phenomena", ["phenomenon", "accuracy"])
        lines += [f"BLiMP ({metrics['blimp_pairs']} pairs):", "", format_table(rows), ""]
    if "babi" in records:
        rows = table("babi", "tasks", ["task", "accuracy", "chance", "n"])
        lines += ["bAbI (zero-shot answer ranking):", "", format_table(rows), ""]
    if "lm-eval" in records:
        lines += ["lm-eval tasks:", "", format_table(records["lm-eval"]["tables"]["tasks"]), ""]
    if "precision" in records:
        lines += ["bf16 vs fp32:", "", format_table(records["precision"]["tables"]["comparison"]), ""]
    commands = sorted({record["command"] for record in records.values()})
    lines += ["Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
    return lines


def card_eval_results(metrics: dict) -> list:
    """huggingface_hub EvalResult entries (task type text-generation) for the metrics a model card reports."""
    from huggingface_hub import EvalResult

    results = []
    for name, value in metrics.items():
        if name not in CARD_ENTRIES or value is None:
            continue
        task_name, dataset_type, dataset_name, split, metric_type, metric_name = CARD_ENTRIES[name]
        results.append(
            EvalResult(
                task_type="text-generation", task_name=task_name, dataset_type=dataset_type,
                dataset_name=dataset_name, dataset_split=split, metric_type=metric_type, metric_name=metric_name,
                metric_value=round(float(value), 4),
            )
        )  # fmt: skip
    return results


def perplexity_settings(records: dict[str, dict], folder: Path) -> dict:
    """Per source, what recomputes its perplexity: data, documents, tokens, windowing and the command."""
    if "perplexity" not in records:
        return {}
    settings = records["perplexity"]["settings"]
    window = settings.get("max_length") or (_load_json(folder / "config.json") or {}).get("max_position_embeddings")
    out = {}
    for row in records["perplexity"]["tables"]["sources"]:
        source = row["source"]
        entry = {
            "source": source,
            **{key: row.get(key) for key in ("path",)},
            **{key: row[key] for key in ("documents", "tokens", "bytes", "nll_nats", "perplexity", "bits_per_byte")},
            **{key: settings.get(key) for key in ("limit_documents", "max_chars", "max_length", "stride")},
            # what amformers.eval.common.document_nll uses when max_length / stride are unset
            "window_tokens": window,
            "stride_tokens": settings.get("stride") or (max(1, window // 2) if window else None),
            "every_document_starts_with": "the tokenizer's BOS (else EOS) token",
        }
        if source == "tinystories-valid":
            path = Path(row.get("path") or "")
            entry["path_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            flags = ["--no-heldout-books", "--tinystories", str(path)]
            for flag, key in (("--limit", "limit_documents"), ("--max-length", "max_length"), ("--stride", "stride")):
                if settings.get(key) is not None:
                    flags += [flag, str(settings[key])]
            entry["recompute_command"] = shlex.join(
                ["python", "-m", "amformers.eval", "perplexity", "--model", str(folder), *flags]
            )
        out[source] = entry
    return out


def eval_results_record(name: str, records: dict[str, dict], metrics: dict, folder: Path) -> dict:
    """The flat summary written to <checkpoint>/eval_results.json: metrics at the top level, then their provenance."""
    return {
        "model": name,
        **metrics,
        "commands": {suite: record["command"] for suite, record in records.items()},
        "limits": suite_limits(records),
        "git_commits": {suite: record["provenance"].get("git_commit") for suite, record in records.items()},
        "perplexity_settings": perplexity_settings(records, folder),
        "generated_by": "python -m amformers.model_card",
    }


def card_block(name: str, records: dict[str, dict], metrics: dict) -> str:
    """The text between the card's eval-results markers: this model's key numbers and tables."""
    rows = [{"metric": METRICS[key].label, "value": value} for key, value in metrics.items()]
    limited = {suite: limit for suite, limit in suite_limits(records).items() if limit is not None}
    lines = [
        f"Zero-shot evaluation with `python -m amformers.eval all` (results `experiments/model_eval/results/{name}/` "
        f"in the amformers repository; key numbers and the commands in `{CARD_RESULTS_FILE}`)"
        + (
            "; the bAbI LoRA rows are test accuracy before and after fine-tuning with `examples/finetune_babi_lora.py`"
            if "babi_lora" in records
            else ""
        )
        + f". Regenerate this block with `{CARDS_COMMAND}`. "
        + (
            "Suites capped with `--limit` (examples per task / paradigm / set): "
            + ", ".join(f"{suite} {limit}" for suite, limit in sorted(limited.items()))
            + "."
            if limited
            else "Every suite ran on all its examples."
        ),
        "",
        format_table(rows),
        "",
        *model_tables(records),
    ]
    return "\n".join(lines).strip()


def replace_card_block(text: str, block: str) -> str:
    """Put `block` between the eval-results markers (adding them before "## Sample generations", else at the end)."""
    marked = f"{CARD_BEGIN}\n{block}\n{CARD_END}"
    if CARD_BEGIN in text and CARD_END in text:
        head, rest = text.split(CARD_BEGIN, 1)
        _, tail = rest.split(CARD_END, 1)
        return f"{head}{marked}{tail}"
    if CARD_BEGIN in text or CARD_END in text:
        raise ValueError(f"The model card has only one of {CARD_BEGIN!r} and {CARD_END!r}; fix or remove it.")
    match = re.search(r"^## Sample generations", text, flags=re.MULTILINE)
    if match:
        return f"{text[: match.start()]}{marked}\n\n{text[match.start() :]}"
    return f"{text.rstrip()}\n\n{marked}\n"


def update_card(path: Path, name: str, records: dict[str, dict], metrics: dict) -> Path:
    """Set the card's model-index to our results (keeping every other entry and all metadata) and its tables."""
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    ours = {(CARD_ENTRIES[key][1], CARD_ENTRIES[key][4]) for key in metrics if key in CARD_ENTRIES}
    kept = [r for r in card.data.eval_results or [] if (r.dataset_type, r.metric_type) not in ours]
    card.data.eval_results = kept + card_eval_results(metrics) or None
    if card.data.eval_results and not card.data.model_name:
        card.data.model_name = name  # the model-index needs a name
    card.text = replace_card_block(card.text, card_block(name, records, metrics))
    card.save(str(path))
    return path


def write_cards(checkpoints: str | Path, results: str | Path) -> list[Path]:
    """eval_results.json and the model card of every checkpoint folder that has results; returns the files written."""
    checkpoints = Path(checkpoints)
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"{checkpoints} is not a folder of checkpoints.")
    models = read_results(results)
    written = []
    for folder in sorted(p for p in checkpoints.iterdir() if p.is_dir() and p.name in models):
        records = models[folder.name]
        metrics = headline_metrics(records, folder)
        target = folder / CARD_RESULTS_FILE
        target.write_text(json.dumps(eval_results_record(folder.name, records, metrics, folder), indent=2) + "\n")
        written.append(target)
        if (folder / "README.md").is_file():
            written.append(update_card(folder / "README.md", folder.name, records, metrics))
        else:
            print(f"{folder} has no README.md model card: wrote only {CARD_RESULTS_FILE}.")
    return written


def render_cards(folders: list[str | Path], repo_id: str | None = None) -> list[Path]:
    """Re-render the card of each saved run / checkpoint folder from its own files (what the pretraining export
    does at the end of a run); the evaluation block comes back empty: fill it with `write_cards`."""
    from .train.export import write_folder_card

    if repo_id and len(folders) > 1:
        raise ValueError("--repo-id names one model: render one folder with it.")
    written = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder (expected a pretraining run or checkpoint folder).")
        written.append(write_folder_card(folder, repo_id=repo_id))
    return written


EXAMPLES = """examples:
  python -m amformers.model_card --results experiments/model_eval/results --checkpoints checkpoints/
  python -m amformers.model_card --render checkpoints/*/

--render rewrites README.md from the template and the folder's files (train_config.yaml, metrics.jsonl,
samples.json, generation_config.json, training_summary.json); weights, config and code are left alone.
--results/--checkpoints then fill each card's evaluation block, model-index and eval_results.json."""


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m amformers.model_card",
        description="Render model cards and write each checkpoint's evaluation results into its card.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--render", nargs="+", type=Path, metavar="FOLDER", help="re-render these folders' cards")
    parser.add_argument("--repo-id", help="Hub repository named in the card's code (default: the folder's path)")
    parser.add_argument("--results", type=Path, help="folder of <model>/<suite>.json result files")
    parser.add_argument("--checkpoints", type=Path, help="folder of checkpoint folders (<model>/)")
    args = parser.parse_args(argv)
    if (args.results is None) != (args.checkpoints is None):
        parser.error("--results and --checkpoints go together")
    if not args.render and args.results is None:
        parser.error("nothing to do: give --render FOLDER..., or --results and --checkpoints (or both)")
    try:
        written = render_cards(args.render, args.repo_id) if args.render else []
        if args.results is not None:
            written += write_cards(args.checkpoints, args.results)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    for path in dict.fromkeys(written):
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
