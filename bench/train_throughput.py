"""Training throughput of the 8M configs on this machine, through the real pretraining loop.

    nice -n 10 python bench/train_throughput.py                 # 4 configs x 11 steps, several minutes on 2 cores
    python bench/train_throughput.py --configs attn_stream-8m --steps 6
    python bench/train_throughput.py --configs attn_stream-8m palimpsa-8m --rounds 3   # in turn, median round

Each config runs `python -m amformers.train.pretrain` in a fresh process on the default data mix (the
shared TinyStories + books; tokenized once into the `datasets` cache), with its real batch (32 blocks of
256 tokens), data loading, clipping, AdamW, scheduler and logging, and with evaluation and checkpointing
turned off. The loop times every step after the first and, inside it, the forward + backward calls; the
rest of a step (fetching and collating the batch, counting target tokens, clipping, the optimizer and
scheduler, metrics) is the overhead, whose goal is under 5% of step time; the data and optimizer parts
are reported separately. Throughputs are also given as a
ratio to a baseline measured in the same run (`--baseline`; default the Llama twin, attn_stream-baseline-8m), with
`--rounds` > 1 also round by round (each round runs every config once, in turn).

Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("attn_stream-baseline-8m", "attn_stream-8m", "palimpsa-8m", "notpalimpsa-8m")
BASELINE = "attn_stream-baseline-8m"
OVERHEAD_GOAL = 0.05


def run_config(name: str, steps: int, output_root: Path, extra: list[str]) -> dict:
    output = output_root / name
    shutil.rmtree(output, ignore_errors=True)
    command = [
        sys.executable, "-m", "amformers.train.pretrain",
        "--config", str(REPO / "train" / "configs" / f"{name}.yaml"),
        "--output_dir", str(output),
        "--max_steps", str(steps),
        "--set", "training.eval_every=0",
        "--set", "training.save_every=0",
        "--set", "training.eval_batches=1",
        *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        return {"config": name, "error": f"exit code {process.returncode}", "stderr": process.stderr[-3000:]}
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    summary = [r for r in records if r["type"] == "summary"][-1]
    train = [r for r in records if r["type"] == "train"]
    return {
        "config": name,
        "parameters": summary["parameters"],
        "tokens_per_step": summary["tokens_per_step"],
        "timed_steps": summary["timed_steps"],
        "tokens_per_second": summary["tokens_per_second"],
        "seconds_per_step": summary["train_seconds"] / summary["timed_steps"],
        "forward_backward_seconds": summary["forward_backward_seconds"],
        "data_seconds": summary["data_seconds"],
        "optimizer_seconds": summary["optimizer_seconds"],
        "train_seconds": summary["train_seconds"],
        "overhead_fraction": summary["overhead_fraction"],
        "first_loss": train[0]["loss"],
        "last_loss": train[-1]["loss"],
        "process_wall_seconds": wall,
        "command": " ".join(command[1:]).replace(str(REPO) + "/", ""),
    }


def median_round(runs: list[dict]) -> dict:
    """A config's round with the median tokens/s (the lower middle one for an even count), with every round's
    tokens/s beside it; a failed round is the result."""
    failed = [run for run in runs if "error" in run]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda run: run["tokens_per_second"])
    result = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        result["tokens_per_second_by_round"] = [run["tokens_per_second"] for run in runs]
    return result


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=11, help="optimizer steps per config (the first is untimed)")
    parser.add_argument("--output_root", default=str(REPO / "runs" / "bench_train_throughput"))
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    parser.add_argument("--baseline", default=BASELINE, help="the config every throughput is divided by")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the configs in turn this many times; each reports its median round"
    )
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more pretrain arguments")
    args = parser.parse_args(argv)

    rounds: dict[str, list[dict]] = {name: [] for name in args.configs}
    for _ in range(args.rounds):  # in turn, so a slow spell of a shared host falls on every config alike
        for name in args.configs:
            rounds[name].append(run_config(name, args.steps, Path(args.output_root), args.extra))
            print(json.dumps(rounds[name][-1]), flush=True)
    results = [median_round(runs) for runs in rounds.values()]
    base_runs = rounds.get(args.baseline, [{"error": "not run"}])
    if args.rounds > 1 and not any("error" in run for run in base_runs):
        for result, runs in zip(results, rounds.values()):
            if "error" not in result:
                ratios = [run["tokens_per_second"] / base["tokens_per_second"] for run, base in zip(runs, base_runs)]
                result["tokens_per_second_vs_baseline_by_round"] = ratios
    baseline = next((r for r in results if r["config"] == args.baseline and "error" not in r), None)
    for result in results:
        if baseline and "error" not in result:
            result["tokens_per_second_vs_baseline"] = result["tokens_per_second"] / baseline["tokens_per_second"]
            result["overhead_under_goal"] = result["overhead_fraction"] < OVERHEAD_GOAL
    report = {
        "benchmark": "training tokens/s of the 8M configs through amformers.train.pretrain, data loading included",
        "command": "python bench/train_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "overhead_goal": OVERHEAD_GOAL,
        "baseline": args.baseline,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
        },
        "results": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
