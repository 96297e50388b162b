"""The result file of every evaluation suite: its schema, the metric names (declared here once), reading and writing.

A suite run on a model writes `<results dir>/<model>/<suite>.json` (results dir: `--results-dir`, default
`./eval_results` in the current directory) holding one JSON object with exactly these fields:

    schema      RESULT_SCHEMA, the version of this layout
    model       the evaluated model's name (its folder name unless `--name` says otherwise)
    suite       the suite that wrote it (`perplexity`, `ioi`, `blimp`, `babi`, `lm-eval`, `precision`, `generate`,
                `babi_lora`)
    command     the command line that produced it
    settings    the suite's options (data paths, limits, seeds, ...)
    metrics     flat {metric name: number or null}; every name is a key of METRICS
    tables      {table name: [row, ...]}, each row a flat object (per-task, per-set, per-source numbers, samples)
    provenance  where and how it ran: model_dir, git_commit, created_utc, seconds, host, model_summary

Readers take a metric by its name (`record["metrics"]["blimp_accuracy"]`); METRICS gives its label, what it
measures and whether it is a headline number (the model comparison and the model card show the headline ones,
in METRICS order). Standard library only, so the model card and the report can read results without torch.
"""

import json
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

RESULT_SCHEMA = "amformers.eval.result/1"
FIELDS = ("schema", "model", "suite", "command", "settings", "metrics", "tables", "provenance")
DEFAULT_RESULTS_DIR = Path("eval_results")  # relative to the current directory
IOI_HEADLINE_SET = "wang-tinystories"  # Wang et al.'s 15 templates x {BABA, ABBA} with TinyStories names


@dataclass(frozen=True)
class Metric:
    label: str  # column / row label in tables
    description: str
    headline: bool = False  # shown in the model comparison and on the model card


METRICS: dict[str, Metric] = {
    "parameters": Metric("parameters", "number of model parameters", True),
    "training_tokens": Metric("training tokens", "tokens seen in pretraining (checkpoint's training_summary.json)",
                              True),
    "tinystories_valid_perplexity": Metric("TinyStories valid ppl", "perplexity on TinyStories valid.txt", True),
    "tinystories_valid_bits_per_byte": Metric("TinyStories valid bits/byte", "bits per UTF-8 byte, TinyStories valid",
                                              True),
    "heldout_books_bits_per_byte": Metric("held-out books bits/byte", "bits per byte, held-out pd-stories chunks",
                                          True),
    "heldout_books_perplexity": Metric("held-out books ppl", "perplexity on the held-out pd-stories chunks"),
    "ioi_accuracy": Metric(f"IOI acc ({IOI_HEADLINE_SET})", "fraction of IOI prompts with logit diff > 0", True),
    "ioi_mean_logit_diff": Metric(f"IOI logit diff ({IOI_HEADLINE_SET})", "mean log P(IO) - log P(S)", True),
    "ioi_official_mean_p_io": Metric("IOI P(IO) (official 8 prompts)", "mean P(IO), Burns et al.'s 8 prompts", True),
    "ioi_official_accuracy": Metric("IOI acc (official 8 prompts)", "IOI accuracy on Burns et al.'s 8 prompts"),
    "blimp_accuracy": Metric("BLiMP acc", "fraction of BLiMP pairs scoring the good sentence higher", True),
    "blimp_paradigm_mean_accuracy": Metric("BLiMP paradigm-mean acc", "BLiMP accuracy averaged over paradigms"),
    "blimp_pairs": Metric("BLiMP pairs", "number of BLiMP minimal pairs scored"),
    "babi_mean_accuracy": Metric("bAbI mean acc (zero-shot)", "zero-shot answer-ranking accuracy, mean over tasks",
                                 True),
    "babi_mean_chance": Metric("bAbI mean chance", "1 / candidates, mean over tasks"),
    "babi_lora_accuracy_before": Metric("bAbI LoRA acc before", "bAbI task 1 test accuracy before LoRA", True),
    "babi_lora_accuracy_after": Metric("bAbI LoRA acc after", "bAbI task 1 test accuracy after LoRA", True),
    "babi_lora_chance": Metric("bAbI LoRA chance", "1 / candidates of the fine-tuned bAbI task"),
    "lm_eval_amformers_blimp_acc": Metric("lm-eval blimp acc", "lm-eval amformers_blimp accuracy", True),
    "lm_eval_amformers_ioi_acc": Metric("lm-eval ioi acc", "lm-eval amformers_ioi accuracy", True),
    "lm_eval_amformers_tinystories_cloze_acc": Metric("lm-eval tinystories_cloze acc",
                                                      "lm-eval last-word cloze accuracy", True),
    "lm_eval_amformers_tinystories_cloze_perplexity": Metric("lm-eval tinystories_cloze perplexity",
                                                             "lm-eval last-word cloze perplexity", True),
    "precision_relative_loss_difference": Metric("bf16 relative loss difference", "|loss_bf16 - loss_fp32| / fp32"),
    "precision_top1_agreement": Metric("bf16 top-1 agreement", "fraction of tokens with the same argmax"),
}  # fmt: skip


def lm_eval_metric_name(task: str, metric: str) -> str:
    """The metric name of lm-eval's `metric` ("acc,none": name,filter) on `task` (declared in METRICS or not)."""
    return f"lm_eval_{task}_{metric.replace(',none', '')}"


def result_path(model: str, suite: str, results_dir: str | Path | None = None) -> Path:
    """<results dir>/<model>/<suite>.json, the results dir defaulting to ./eval_results."""
    return Path(results_dir if results_dir is not None else DEFAULT_RESULTS_DIR) / model / f"{suite}.json"


def check_result(record, where: str = "result") -> dict:
    """`record` if it follows the schema, else a ValueError naming the first problem."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a result must be a JSON object, not {type(record).__name__}.")
    if record.get("schema") != RESULT_SCHEMA:
        raise ValueError(f"{where}: schema is {record.get('schema')!r}, expected {RESULT_SCHEMA!r}.")
    missing = [field for field in FIELDS if field not in record]
    extra = [field for field in record if field not in FIELDS]
    if missing or extra:
        raise ValueError(f"{where}: fields missing {missing}, unknown {extra} (the fields are {list(FIELDS)}).")
    for field in ("model", "suite", "command"):
        if not isinstance(record[field], str) or not record[field]:
            raise ValueError(f"{where}: {field} must be a non-empty string, not {record[field]!r}.")
    for field in ("settings", "metrics", "tables", "provenance"):
        if not isinstance(record[field], dict):
            raise ValueError(f"{where}: {field} must be an object, not {type(record[field]).__name__}.")
    for name, value in record["metrics"].items():
        if name not in METRICS:
            raise ValueError(f"{where}: metric {name!r} is not declared in amformers.eval.results.METRICS.")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{where}: metric {name!r} must be a number or null, not {value!r}.")
    for name, rows in record["tables"].items():
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f"{where}: table {name!r} must be a list of objects (rows).")
    return record


def write_result(
    path: str | Path, *, model: str, suite: str, command: str, settings: dict, metrics: dict, tables: dict,
    provenance: dict,
) -> Path:  # fmt: skip
    """Check and write one result file (non-finite numbers become null); returns its path."""
    record = {
        "schema": RESULT_SCHEMA, "model": model, "suite": suite, "command": command, "settings": settings,
        "metrics": metrics, "tables": tables, "provenance": provenance,
    }  # fmt: skip
    record = json.loads(json.dumps(record, default=_json_default), parse_constant=lambda _: None)
    check_result(record, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def read_result(path: str | Path) -> dict:
    """One result file, checked against the schema."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No result file at {path}.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from None
    return check_result(record, str(path))


def read_results(results_dir: str | Path) -> dict[str, dict[str, dict]]:
    """{model: {suite: record}} for every <model>/<suite>.json below `results_dir` (models and suites sorted)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"Results folder {results_dir} does not exist.")
    models = {}
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        records = {path.stem: read_result(path) for path in sorted(folder.glob("*.json"))}
        if records:
            models[folder.name] = records
    return models


def git_commit(cwd: str | Path | None = None) -> str | None:
    """Short commit of the checkout holding `cwd` (default: the amformers source), None outside git."""
    cwd = cwd if cwd is not None else Path(__file__).resolve().parent  # provenance of the code, not a location
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(model_dir, started: float | None = None, model_summary: dict | None = None, **extra) -> dict:
    """Where and how a result was made: the model folder, commit, time, duration, host versions."""
    host = {"python": platform.python_version()}
    try:
        import torch

        host |= {"torch": torch.__version__, "threads": torch.get_num_threads()}
    except ImportError:
        pass
    return {
        "model_dir": str(Path(model_dir).resolve()),
        "git_commit": git_commit(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": None if started is None else round(time.time() - started, 2),
        "host": host,
        **({"model_summary": model_summary} if model_summary is not None else {}),
        **extra,
    }


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"Cannot write {type(value).__name__} to a result file.")


def format_table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = ".4f") -> str:
    """A GitHub-markdown table of `rows` (dicts), for printing and for the report and model cards."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        if isinstance(value, float):
            return format(value, floatfmt)
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
