"""The shipped models' part of the report: one comparison table of headline metrics, the twins' differences, and
each model's tables. Every number comes from `results/<model>/<suite>.json` (amformers.eval.results schema) and,
for training tokens, the checkpoint's training_summary.json.
"""

from pathlib import Path

from amformers.eval.results import IOI_HEADLINE_SET, METRICS, format_table, read_results
from amformers.model_card import headline_metrics, model_tables, suite_limits

from .. import REPO_ROOT

RESULTS = Path(__file__).resolve().parent / "results"
CHECKPOINTS = REPO_ROOT / "checkpoints"
# (model, its twin, what their difference isolates, the metrics compared)
PAIRS = (
    ("attn_stream-8m", "attn_stream-baseline-8m", "values stream",
     ("training_tokens", "ioi_accuracy", "ioi_mean_logit_diff", "ioi_official_mean_p_io")),
    ("palimpsa-8m", "notpalimpsa-8m", "metaplasticity",
     ("training_tokens", "tinystories_valid_perplexity", "tinystories_valid_bits_per_byte",
      "heldout_books_bits_per_byte", "blimp_accuracy", "ioi_accuracy", "ioi_mean_logit_diff")),
)  # fmt: skip


def _limits_cell(records: dict[str, dict]) -> str:
    values = set(suite_limits(records).values())
    return ", ".join(["all"] * (None in values) + [str(v) for v in sorted(values - {None})])


def comparison_section(results: Path = RESULTS, checkpoints: Path = CHECKPOINTS) -> list[str]:
    """One table of every model's headline numbers, then each twin pair's differences."""
    records = read_results(results)
    models = {name: headline_metrics(model_records, checkpoints / name) for name, model_records in records.items()}
    models = {name: metrics for name, metrics in models.items() if metrics}
    if not models:
        return []
    names = [name for name in METRICS if any(name in metrics for metrics in models.values())]
    rows = [
        {"model": model, **{METRICS[n].label: metrics.get(n) for n in names}, "--limit": _limits_cell(records[model])}
        for model, metrics in models.items()
    ]
    lines = [
        "## Model comparison",
        "",
        "From experiments/model_eval/results/<model>/*.json; every suite is zero-shot except bAbI LoRA (accuracy "
        f"before and after LoRA fine-tuning, babi_lora.json). IOI acc and logit diff: the `{IOI_HEADLINE_SET}` set "
        "(Wang et al.'s 15 templates x {BABA, ABBA}); IOI P(IO): mean probability of the indirect object on Burns "
        "et al.'s 8 prompts (the paper's metric). "
        + ("Training tokens from the checkpoint's training_summary.json. " if "training_tokens" in names else "")
        + "--limit: the examples per task / paradigm / set the suites were capped at (all: none).",
        "",
        format_table(rows),
        "",
    ]
    pair_rows = []
    for model, twin, isolates, compared in PAIRS:
        if model not in models or twin not in models:
            continue
        for name in compared:
            if name not in models[model] or name not in models[twin]:
                continue
            a, b = models[model][name], models[twin][name]
            pair_rows.append(
                {
                    "comparison": f"{model} - {twin} ({isolates})",
                    "metric": METRICS[name].label,
                    "model": a,
                    "twin": b,
                    "difference": a - b,
                    "model is": "higher" if a > b else "lower" if a < b else "equal",
                }
            )
    if pair_rows:
        lines += ["Paired comparisons (model minus its twin):", "", format_table(pair_rows), ""]
    return lines


def model_sections(results: Path = RESULTS) -> list[str]:
    """Each model's tables, one section per model."""
    lines = []
    for name, records in read_results(results).items():
        lines += [f"## Model `{name}`", ""] + model_tables(records)
    return lines
