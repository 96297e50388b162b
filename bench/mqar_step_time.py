"""Training-step time of every MQAR family at one shape, each against attention in the same run, and what the
10x-budget claim grid would cost from those numbers.

    python bench/mqar_step_time.py                     # CPU, 1 thread: bench/results/mqar_step_time.json
    python bench/mqar_step_time.py --device cuda       # on a GPU (recurrent families through the Triton kernels)

One step = forward (LM head at the asked positions, as experiments/mqar/sweep.py trains), cross-entropy, backward,
AdamW step. The models are the sweep's own (`build_model`: 2 layers, no MLP; attention with one head of width
d_model, the recurrent families with heads of key dim 16, value dim 32). After `--warmup` steps each, the families
take turns step by step (`--steps` rounds), so a change of machine load hits them all alike; the table gives each
family's median step (wall clock, and process CPU time: on a loaded machine the wall clock includes waiting for a
core) and its ratio to attention's median, with the load average before and after.

The claim grid (issue 18): 4 recurrent families x 4 learning rates x `--claim-seeds` seeds at (256, 64),
`--claim-steps` steps of batch 64 each; its cost is steps x median step time per run, with no early stop (an upper
bound; test evaluations add a few percent).
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.mqar.sweep import asked_logits, build_model  # noqa: E402
from experiments.mqar.task import mqar  # noqa: E402

FAMILIES = ("attention", "palimpsa", "not_palimpsa", "meta_mamba2", "mamba2")
RECURRENT = ("palimpsa", "not_palimpsa", "meta_mamba2", "mamba2")
RESULTS = Path(__file__).resolve().parent / "results"


def use_triton_if_cuda(model, family: str, device: str):
    """On CUDA the recurrent families run their Triton kernels (the PyTorch scan is the CPU path); attention keeps
    PyTorch's SDPA (FlashAttention on GPU)."""
    if device.startswith("cuda") and family in RECURRENT:
        model.set_attn_implementation("amformers_triton")
    return model


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(families, d_model, seq_len, kv, batch_size, vocab_size, warmup, steps, device, seed=0) -> dict:
    x, y = mqar(batch_size, seq_len, kv, vocab_size, seed=seed)
    x, y = x.to(device), y.to(device)
    runs = {}
    for family in families:
        torch.manual_seed(seed)
        model = build_model(family, d_model, seq_len, vocab_size)
        if model is None:
            print(f"{family}: not installed, skipped", flush=True)
            continue
        model = use_triton_if_cuda(model.to(device), family, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        runs[family] = {"model": model, "optimizer": optimizer, "times": [], "cpu_times": []}

    def step(run) -> tuple[float, float]:
        synchronise(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        logits, targets = asked_logits(run["model"], x, y)
        loss = nn.functional.cross_entropy(logits, targets)
        run["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        run["optimizer"].step()
        synchronise(device)
        return time.perf_counter() - started, time.process_time() - cpu_started

    for run in runs.values():
        for _ in range(warmup):
            step(run)
    for _ in range(steps):  # round robin: machine load drifts alike for every family
        for run in runs.values():
            wall, cpu = step(run)
            run["times"].append(wall)
            run["cpu_times"].append(cpu)
    reference = statistics.median(runs["attention"]["times"]) if "attention" in runs else None
    return {
        family: {
            "median_step_seconds": statistics.median(run["times"]),
            "min_step_seconds": min(run["times"]),
            "max_step_seconds": max(run["times"]),
            "step_seconds": run["times"],
            "median_step_cpu_seconds": statistics.median(run["cpu_times"]),
            "cpu_ratio_to_attention": (
                statistics.median(run["cpu_times"]) / statistics.median(runs["attention"]["cpu_times"])
                if "attention" in runs
                else None
            ),
            "ratio_to_attention": statistics.median(run["times"]) / reference if reference else None,
            "parameters": sum(p.numel() for p in run["model"].parameters()),
        }
        for family, run in runs.items()
    }


def claim_grid_cost(rows: dict, steps: int, lrs: int, seeds: int) -> dict:
    """Device-hours of the claim grid from the median wall-clock step, and (on CPU) CPU-hours from the median
    process CPU time per step (what a run costs on an unloaded core; the wall time includes waiting for the CPU)."""
    per_family = {
        family: {
            "runs": lrs * seeds,
            "hours": lrs * seeds * steps * rows[family]["median_step_seconds"] / 3600,
            "hours_per_run": steps * rows[family]["median_step_seconds"] / 3600,
            "cpu_hours": lrs * seeds * steps * rows[family]["median_step_cpu_seconds"] / 3600,
        }
        for family in RECURRENT
        if family in rows
    }
    return {
        "grid": f"{len(per_family)} recurrent families x {lrs} lrs x {seeds} seeds, {steps} steps each, no early stop",
        "per_family": per_family,
        "total_hours": sum(f["hours"] for f in per_family.values()),
        "total_cpu_hours": sum(f["cpu_hours"] for f in per_family.values()),
    }


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--kv-pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the sweep runs with 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--claim-steps", type=int, default=10_000)
    parser.add_argument("--claim-lrs", type=int, default=4)
    parser.add_argument("--claim-seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/mqar_step_time[_cuda].json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/mqar_step_time.py: no CUDA device", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = measure(
        args.families, args.d_model, args.seq_len, args.kv_pairs, args.batch_size, args.vocab_size, args.warmup,
        args.steps, args.device,
    )  # fmt: skip
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {
        "command": ("python bench/mqar_step_time.py " + shlex.join(argv)).rstrip(),
        "shape": {k: getattr(args, k) for k in ("d_model", "seq_len", "kv_pairs", "batch_size", "vocab_size")},
        "device": args.device,
        "device_name": device_name,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "torch": torch.__version__,
        "warmup": args.warmup,
        "steps": args.steps,
        "step": "forward (LM head at asked positions) + cross-entropy + backward + AdamW step",
        "families": rows,
        "claim_grid": claim_grid_cost(rows, args.claim_steps, args.claim_lrs, args.claim_seeds),
        "written": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = args.out or RESULTS / ("mqar_step_time.json" if args.device == "cpu" else "mqar_step_time_cuda.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for family, row in rows.items():
        ratio = row["ratio_to_attention"]
        print(f"{family:13s} {row['median_step_seconds'] * 1000:9.1f} ms/step  x{ratio:.2f} attention" if ratio else
              f"{family:13s} {row['median_step_seconds'] * 1000:9.1f} ms/step")  # fmt: skip
    claim = result["claim_grid"]
    print(
        f"claim grid: {claim['total_hours']:.1f} device-hours, {claim['total_cpu_hours']:.1f} CPU-hours by process "
        f"CPU time ({claim['grid']}) -> {out}"
    )
    return result


if __name__ == "__main__":
    main()
