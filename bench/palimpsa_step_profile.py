"""Where a palimpsa-8m training step spends its time, against attn_stream-8m, eager and under `torch.compile`.

    python bench/palimpsa_step_profile.py       # writes bench/results/palimpsa_step_profile.json (~5 min, 1 thread)

Both models are built from their pretraining YAMLs (train/configs/*-8m.yaml) and run forward + backward on the same
random batch (`--batch` x `--seq_len` tokens; the 8M runs use 32 x 256, split here to keep the bench short), fp32,
one torch thread, taking turns for `--rounds` rounds (each model's best round counts). The ratio
`palimpsa_over_attn_stream` is AttnStream's step time over Palimpsa's, the same direction as the tokens/s ratio of
`bench/train_throughput.py`. The Palimpsa step is then profiled once: the memory op (its forward and hand-written
backward: `PalimpsaCpuFunction`, the fused C++ loop, or `PalimpsaChunkFunction` where that cannot build), the dense
matrix products (`aten::mm`, i.e. projections, MLP and LM head),
and the rest. `--no-compile` skips the compiled models (compiling takes a minute or two per model on a CPU).
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from amformers.modeling.kernels.palimpsa_cpu import cpu_kernel_threads, cpu_kernel_unavailable
from amformers.train.config import build_model, build_model_config, load_config

REPO = Path(__file__).resolve().parents[1]
MODELS = {"attn_stream-8m": "train/configs/attn_stream-8m.yaml", "palimpsa-8m": "train/configs/palimpsa-8m.yaml"}


def build(name: str):
    config = load_config(REPO / MODELS[name])
    torch.manual_seed(0)
    return build_model(build_model_config(config), attn_implementation=config.get("attn_implementation")).train()


def train_step(model, ids) -> None:
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def best_step_seconds(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def profile_palimpsa(model, ids) -> dict:
    from torch.profiler import ProfilerActivity, profile

    train_step(model, ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(model, ids)
    events = {e.key: e for e in prof.key_averages()}
    total = sum(e.self_cpu_time_total for e in events.values())

    def cpu_time(name: str, own_only: bool = False) -> float:
        event = events.get(name)
        return 0.0 if event is None else event.self_cpu_time_total if own_only else event.cpu_time_total

    # Whichever path the default picked: the fused C++ loop where it builds, else the chunked scan.
    op_forward = cpu_time("PalimpsaCpuFunction") + cpu_time("PalimpsaChunkFunction")
    op_backward = cpu_time("PalimpsaCpuFunctionBackward") + cpu_time("PalimpsaChunkFunctionBackward")
    mm = cpu_time("aten::mm", own_only=True)
    return {
        "memory_op_forward": op_forward / total,
        "memory_op_backward": op_backward / total,
        "dense_matmul_mm": mm / total,
        "rest": max(0.0, 1 - (op_forward + op_backward + mm) / total),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "palimpsa_step_profile.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = torch.randint(3, 8192, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))

    models = {name: build(name) for name in MODELS}
    runs = {name: (lambda m=m: train_step(m, ids)) for name, m in models.items()}
    compile_seconds, compile_errors = {}, {}
    if not args.no_compile:
        for name, model in models.items():
            compiled = torch.compile(model)
            start = time.perf_counter()
            try:
                train_step(compiled, ids)
            except Exception as error:  # a compiler that cannot run here: report it, keep the eager numbers
                compile_errors[name] = f"{type(error).__name__}: {error}"[:500]
                continue
            compile_seconds[name] = time.perf_counter() - start
            runs[f"{name} (torch.compile)"] = lambda c=compiled: train_step(c, ids)
    for step in runs.values():  # warm-up
        step()
    seconds = {name: float("inf") for name in runs}
    for round_ in range(args.rounds):
        for name, step in runs.items():
            seconds[name] = min(seconds[name], best_step_seconds(step, args.steps))
            print(f"round {round_}: {name}: {seconds[name]:.3f} s/step (best so far)", flush=True)

    def ratio(a, b):
        return seconds[b] / seconds[a] if a in seconds and b in seconds else None

    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
        "palimpsa_memory_op": "palimpsa_chunk" if cpu_kernel_unavailable() else "palimpsa_cpu (fused C++)",
        "cpu_ops_threads": None if cpu_kernel_unavailable() else cpu_kernel_threads(),
        "seconds_per_step": seconds,
        "palimpsa_over_attn_stream": {
            "eager": ratio("palimpsa-8m", "attn_stream-8m"),
            "torch.compile": ratio("palimpsa-8m (torch.compile)", "attn_stream-8m (torch.compile)"),
        },
        "compile_speedup": {name: ratio(f"{name} (torch.compile)", name) for name in MODELS},
        "compile_seconds": compile_seconds,
        "compile_errors": compile_errors,
        "palimpsa_eager_step_share": profile_palimpsa(models["palimpsa-8m"], ids),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("palimpsa_over_attn_stream", "compile_speedup")}, indent=2))
    print(json.dumps(result["palimpsa_eager_step_share"], indent=2))
    return result


if __name__ == "__main__":
    main()
