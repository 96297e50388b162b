"""Package a finished pretraining run as a shipped checkpoint: what a user loads, nothing that resumes training.

    python -m amformers.train.ship runs/ckpt8m/attn_stream-8m checkpoints/attn_stream-8m

Copies from the run folder the model (config, safetensors weights, generation config, tokenizer, and the
remote-code `.py` files that make `trust_remote_code=True` work without the package), the model card with what it
shows (training curve, sample generations) and the training record (`metrics.jsonl`, `train_config.yaml`), then
writes `training_summary.json`: the exact token count, steps, and the training time summed over the logged steps.
Optimizer states and step checkpoints stay behind. The copy is made in a temporary sibling folder and renamed, so a
destination either holds a complete checkpoint or is left as it was.

`--refresh-code FOLDER...` instead rewrites the remote-code files of already shipped folders from the installed
package (after a fix to the models), leaving weights and config as they are.

Refuses a run that has not finished (no final model, or fewer logged steps than its config's `max_steps`) and a
checkpoint over `--max_mb` (40 MB: the shipped 8M models are ~34 MB in fp32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import yaml

from ..model_folder import ModelFolderError, require_model_folder

MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
RECORD_FILES = ("README.md", "training_curve.png", "samples.json", "metrics.jsonl", "train_config.yaml")
SUMMARY_FILE = "training_summary.json"


class ShipError(RuntimeError):
    """A run that cannot be shipped as it is."""


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_summary(run: Path) -> dict:
    """Exact tokens and steps of a finished run, and its training time summed over the logged steps."""
    config = yaml.safe_load((run / "train_config.yaml").read_text(encoding="utf-8"))
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval"]
    max_steps = int(config["training"]["max_steps"])
    steps = sorted({r["step"] for r in train})
    if steps != list(range(1, max_steps + 1)):
        missing = max_steps - len(steps)
        raise ShipError(f"{run}/metrics.jsonl logs {len(steps)} of {max_steps} steps ({missing} missing): not finished")
    tokens_per_step = train[-1]["tokens"] // train[-1]["step"]
    # Each record is one optimizer step; its duration is tokens_per_step / tokens_per_second (evaluation and
    # checkpoint writing happen between steps and are not included).
    seconds = sum(tokens_per_step / r["tokens_per_second"] for r in train if r.get("tokens_per_second"))
    final_eval = max(evals, key=lambda r: r["step"]) if evals else None
    return {
        "model_type": config["model_type"],
        "description": config.get("description"),
        "steps": max_steps,
        "tokens": tokens_per_step * max_steps,
        "tokens_per_step": tokens_per_step,
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens_per_step * max_steps / seconds, 1) if seconds else None,
        "final_val_loss": final_eval["val_loss"] if final_eval else None,
        "final_val_perplexity": math.exp(final_eval["val_loss"]) if final_eval else None,
        "final_train_loss": train[-1]["loss"],
        "seed": config["training"]["seed"],
    }


def ship(run: str | Path, destination: str | Path, max_mb: float = 40.0, note: str | None = None) -> Path:
    run, destination = require_model_folder(run), Path(destination)
    missing = [name for name in (*MODEL_FILES, *RECORD_FILES) if not (run / name).is_file()]
    if missing:
        raise ShipError(f"{run} is not a finished run folder: missing {', '.join(missing)}")
    summary = training_summary(run)
    if note:
        summary["note"] = note
    files = [run / name for name in (*MODEL_FILES, *RECORD_FILES)] + sorted(run.glob("*.py"))
    size = sum(f.stat().st_size for f in files)
    if size > max_mb * 1e6:
        raise ShipError(f"{run} would ship {size / 1e6:.1f} MB, over the {max_mb:g} MB limit")

    staging = destination.with_name(f".{destination.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, staging / f.name)
    (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if destination.exists():
        backup = destination.with_name(f".{destination.name}.previous")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(destination, backup)
        os.replace(staging, destination)
        shutil.rmtree(backup)
    else:
        os.replace(staging, destination)
    print(
        f"shipped {run} -> {destination}: {size / 1e6:.1f} MB, {summary['tokens']:,} tokens in {summary['steps']} "
        f"steps, {summary['train_seconds'] / 3600:.2f} h of training steps"
    )
    return destination


def refresh_code(folders: list[str | Path]) -> None:
    """Rewrite each saved folder's remote-code `.py` files from the installed package (weights and config
    untouched), so shipped checkpoints follow fixes to the models:
    `python -m amformers.train.ship --refresh-code checkpoints/*/`."""
    import amformers
    from amformers.modeling.remote_code import refresh_remote_code

    for folder in folders:
        folder = require_model_folder(folder)
        architecture = json.loads((folder / "config.json").read_text())["architectures"][0]
        written = refresh_remote_code(folder, getattr(amformers, architecture))
        print(f"{folder}: {', '.join(written)}")


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--refresh-code"]:
        if not argv[1:]:
            raise SystemExit("error: --refresh-code needs the checkpoint folders to refresh, e.g. checkpoints/*/")
        return refresh_code(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m amformers.train.ship",
        description=__doc__.splitlines()[0],
        epilog=(
            "examples:\n"
            "  python -m amformers.train.ship runs/attn_stream-8m checkpoints/attn_stream-8m\n"
            "  python -m amformers.train.ship --refresh-code checkpoints/*/\n"
            "\n--refresh-code FOLDER... rewrites saved folders' remote-code files from the installed package."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", help="a finished pretraining output folder")
    parser.add_argument("destination", help="the checkpoint folder to write, e.g. checkpoints/attn_stream-8m")
    parser.add_argument("--max_mb", type=float, default=40.0, help="refuse checkpoints larger than this")
    parser.add_argument("--note", help="a remark stored in training_summary.json (e.g. how the run was scheduled)")
    args = parser.parse_args(argv)
    return ship(args.run, args.destination, args.max_mb, args.note)


if __name__ == "__main__":
    try:
        main()
    except (ShipError, ModelFolderError) as error:
        sys.exit(f"error: {error}")
