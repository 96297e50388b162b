"""BLiMP (Warstadt et al. 2020): is log P(good sentence) > log P(bad sentence) for each minimal pair?

Reads the 67 `*.jsonl` paradigm files from `../shared/data/blimp/` (relative to the project root) or `--data`.
Each sentence is scored whole, after the prefix token (as lm-eval's `blimp` task does with its empty context).
Reports accuracy overall, per phenomenon (`linguistics_term`: anaphor agreement, island effects, ...), per paradigm
(UID, 67) and per field (syntax, morphology, ...).
"""

import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from ..corpus import data_dir
from .common import load_model, save_result, score_continuations
from .results import format_table


def paradigm_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.jsonl"))


def load_pairs(folder: str | Path, limit: int | None = None, paradigms=None) -> list[dict]:
    """Minimal pairs from every paradigm file, `limit` per paradigm."""
    pairs = []
    for path in paradigm_files(folder):
        if paradigms and path.stem not in paradigms:
            continue
        with path.open(encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        for record in records[:limit] if limit else records:
            pairs.append(
                {
                    "uid": record.get("UID", path.stem),
                    "field": record.get("field", "unknown"),
                    "phenomenon": record.get("linguistics_term", "unknown"),
                    "good": record["sentence_good"],
                    "bad": record["sentence_bad"],
                }
            )
    return pairs


def evaluate(model, tokenizer, pairs: list[dict], batch_size: int = 32) -> dict:
    texts = [("", p["good"]) for p in pairs] + [("", p["bad"]) for p in pairs]
    scores = score_continuations(model, tokenizer, texts, batch_size=batch_size, desc="blimp")
    correct = [good.logprob > bad.logprob for good, bad in zip(scores[: len(pairs)], scores[len(pairs) :])]
    by_uid, by_field, by_phenomenon = defaultdict(list), defaultdict(list), defaultdict(list)
    for pair, ok in zip(pairs, correct):
        by_uid[pair["uid"]].append(ok)
        by_field[pair["field"]].append(ok)
        by_phenomenon[pair.get("phenomenon", "unknown")].append(ok)
    per_uid = {uid: statistics.fmean(v) for uid, v in sorted(by_uid.items())}
    return {
        "n": len(pairs),
        "accuracy": statistics.fmean(correct) if correct else float("nan"),
        # The usual BLiMP headline averages the paradigms (each has 1000 pairs, so both agree on full data).
        "paradigm_mean_accuracy": statistics.fmean(per_uid.values()) if per_uid else float("nan"),
        "per_phenomenon": {term: statistics.fmean(v) for term, v in sorted(by_phenomenon.items())},
        "per_field": {field: statistics.fmean(v) for field, v in sorted(by_field.items())},
        "per_paradigm": per_uid,
    }


def main(args) -> dict | None:
    started = time.time()
    folder = args.blimp_data or data_dir() / "blimp"
    if not paradigm_files(folder):
        print(f"BLiMP data not found in {folder}: skipping.", file=sys.stderr)
        return None
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    pairs = load_pairs(folder, args.limit)
    result = evaluate(model, tokenizer, pairs, args.batch_size)
    rows = [{"phenomenon": "ALL", "accuracy": result["accuracy"]}] + [
        {"phenomenon": k, "accuracy": v} for k, v in result["per_phenomenon"].items()
    ]
    print(format_table(rows))
    print(format_table([{"paradigm": k, "accuracy": v} for k, v in result["per_paradigm"].items()]))
    settings = {"data": str(Path(folder).resolve()), "limit_per_paradigm": args.limit}
    save_result(
        args, "blimp", settings=settings, metrics=headline_metrics(result), tables=result_tables(result), model=model,
        started=started,
    )  # fmt: skip
    return result


def headline_metrics(result: dict) -> dict:
    return {
        "blimp_accuracy": result["accuracy"],
        "blimp_paradigm_mean_accuracy": result["paradigm_mean_accuracy"],
        "blimp_pairs": result["n"],
    }


def result_tables(result: dict) -> dict:
    """Accuracy per phenomenon, per field and per paradigm."""
    return {
        "phenomena": [{"phenomenon": k, "accuracy": v} for k, v in result["per_phenomenon"].items()],
        "fields": [{"field": k, "accuracy": v} for k, v in result["per_field"].items()],
        "paradigms": [{"paradigm": k, "accuracy": v} for k, v in result["per_paradigm"].items()],
    }


def add_arguments(parser):
    parser.add_argument("--blimp-data", help="folder of BLiMP *.jsonl files (default: <data dir>/blimp)")
