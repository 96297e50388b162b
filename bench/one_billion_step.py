"""One real training step of each 1B config on the CPU: parameters, peak RSS, seconds, and per-GPU memory.

    nice -n 10 python bench/one_billion_step.py                      # all four 1B configs, a few minutes each
    python bench/one_billion_step.py --configs attn_stream-1b --seq_len 128

Each config runs in its own fresh process (so peak RSS is that model's): build the model exactly as the
pretraining loop does (YAML -> AutoConfig -> AutoModelForCausalLM.from_config, real initialisation, float32),
then one forward, backward and AdamW step on a batch of 1 x seq_len tokens.

AdamW in float32 needs 16 bytes per parameter (weights, gradients, two moments): ~16.5 GB at 1B, close to
this machine's RAM. With `--optimizer auto` (default) the step uses the standard optimizer when that fits
in the available memory with 8 GiB to spare, and otherwise fuses the update into the backward pass (a
per-parameter AdamW run by a post-accumulate-grad hook, which frees each gradient right after its update:
12 bytes per parameter at the peak). The JSON records which one ran.

From the same process it measures the bytes of activations saved for backward (float32, and under bf16
autocast, with a saved-tensors hook) and turns them into the per-GPU memory table of the README: model
states sharded by FSDP FULL_SHARD / ZeRO-3 over N GPUs (16 bytes per parameter / N), two gathered decoder
layers in bf16, and the activations of one micro-batch of the config (linear in tokens, which assumes a
memory-efficient attention kernel, as SDPA uses on GPUs). These are computed, not measured on a GPU.

Writes bench/results/one_billion_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("attn_stream-1b", "attn_stream-baseline-1b", "palimpsa-1b", "notpalimpsa-1b")
GPU_COUNTS = (1, 2, 4, 8)
BYTES_PER_PARAMETER_ADAMW = 16  # fp32 weights 4 + gradients 4 + Adam moments 8 (ZeRO-3 bf16: 2 + 2 + 4 + 8)
GIB = 1024**3


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


class SavedActivations:
    """Bytes of distinct tensors autograd saves for backward, excluding parameters and their dtype casts."""

    def __init__(self, model):
        self.parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.parameter_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() >= 2}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        cast_of_parameter = tensor.dim() >= 2 and tuple(tensor.shape) in self.parameter_shapes
        if pointer not in self.seen and pointer not in self.parameter_storages and not cast_of_parameter:
            self.seen.add(pointer)
            self.bytes += storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)


def decoder_layer_parameters(model) -> int:
    """Parameters of the largest module FSDP would shard as a unit (the model's _no_split_modules)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in names]
    return max(sizes) if sizes else 0


def run_child(name: str, seq_len: int, optimizer_mode: str) -> dict:
    import psutil

    import amformers  # noqa: F401
    from amformers.train.config import build_model, build_model_config, load_config, parameter_groups
    from amformers.train.tokenizer import load_tokenizer

    config = load_config(REPO / "train" / "configs" / f"{name}.yaml")
    tokenizer = load_tokenizer(config["tokenizer"])
    model_config = build_model_config(config, tokenizer)
    # Decide before allocating anything: other jobs share this machine, and running it out of memory
    # could get one of theirs killed. The standard step needs 16 bytes/parameter, the fused one 12.
    parameters = build_model(model_config, config["attn_implementation"], device="meta").num_parameters()
    available = psutil.virtual_memory().available
    needs = {"standard": 16 * parameters + 2 * GIB, "in_backward": 12 * parameters + 2 * GIB}
    if optimizer_mode == "auto":  # leave room for the other jobs to grow, too
        optimizer_mode = "standard" if available > needs["standard"] + 6 * GIB else "in_backward"
    if available <= needs[optimizer_mode]:
        raise MemoryError(
            f"{name}: {available / GIB:.1f} GiB available, but an AdamW step ({optimizer_mode}) of "
            f"{parameters / 1e9:.2f} B parameters needs {needs[optimizer_mode] / GIB:.1f} GiB with a 2 GiB "
            "margin; rerun when the machine is quieter."
        )
    torch.manual_seed(0)
    rss_start = rss_bytes()
    start = time.perf_counter()
    model = build_model(model_config, config["attn_implementation"])
    model.train()
    build_seconds = time.perf_counter() - start
    parameters = model.num_parameters()
    rss_model = rss_bytes()

    training = config["training"]
    adamw = {
        "lr": float(training["learning_rate"]),
        "betas": (float(training["adam_beta1"]), float(training["adam_beta2"])),
        "eps": float(training["adam_epsilon"]),
        "foreach": False,
    }
    if optimizer_mode == "standard":
        optimizer = torch.optim.AdamW(parameter_groups(model, float(training["weight_decay"])), **adamw)
    else:
        per_parameter = {}
        for parameter in model.parameters():
            decay = float(training["weight_decay"]) if parameter.ndim >= 2 else 0.0
            per_parameter[parameter] = torch.optim.AdamW([parameter], weight_decay=decay, **adamw)

        def step_and_free(parameter):
            per_parameter[parameter].step()
            parameter.grad = None

        for parameter in model.parameters():
            parameter.register_post_accumulate_grad_hook(step_and_free)

    tokens = torch.randint(3, model.config.vocab_size, (1, seq_len))
    # bf16-autocast activations (what a mixed-precision GPU run saves), measured without a backward
    saved_bf16 = SavedActivations(model)
    with saved_bf16.hooks(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    del loss

    saved_fp32 = SavedActivations(model)
    start = time.perf_counter()
    with saved_fp32.hooks():
        loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    forward_seconds = time.perf_counter() - start
    start = time.perf_counter()
    loss.backward()
    backward_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if optimizer_mode == "standard":
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(training["max_grad_norm"]))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    optimizer_seconds = time.perf_counter() - start

    layer = decoder_layer_parameters(model)
    tokens_per_micro_batch = int(training["batch_size"]) * int(config["data"]["block_size"])
    activation_per_token_bf16 = saved_bf16.bytes / seq_len
    per_gpu = []
    for gpus in GPU_COUNTS:
        states = BYTES_PER_PARAMETER_ADAMW * parameters / gpus
        gathered = 2 * 2 * layer if gpus > 1 else 0  # current + prefetched layer, unsharded in bf16
        activations = activation_per_token_bf16 * tokens_per_micro_batch
        per_gpu.append(
            {
                "gpus": gpus,
                "model_states_gib": states / GIB,
                "gathered_layers_gib": gathered / GIB,
                "activations_gib": activations / GIB,
                "total_gib": (states + gathered + activations) / GIB,
            }
        )
    return {
        "config": name,
        "model_type": config["model_type"],
        "parameters": parameters,
        "decoder_layer_parameters": layer,
        "seq_len": seq_len,
        "batch_size": 1,
        "loss": float(loss.detach()),
        "optimizer": optimizer_mode,
        "seconds": {
            "build": build_seconds,
            "forward": forward_seconds,
            "backward": backward_seconds,
            "optimizer": optimizer_seconds,
            "step": forward_seconds + backward_seconds + optimizer_seconds,
        },
        "rss_gib": {
            "start": rss_start / GIB,
            "after_build": rss_model / GIB,
            "peak": peak_rss_bytes() / GIB,
        },
        "saved_activations_bytes_per_token": {
            "fp32": saved_fp32.bytes / seq_len,
            "bf16_autocast": activation_per_token_bf16,
        },
        "per_gpu_estimate": {
            "assumptions": (
                "FSDP FULL_SHARD or ZeRO-3 over N GPUs with bf16 mixed precision: 16 bytes/parameter of model "
                "states sharded N ways, two decoder layers gathered in bf16, activations of one micro-batch of "
                f"{training['batch_size']} x {config['data']['block_size']} tokens scaled linearly from the "
                f"bf16-autocast saved tensors at {seq_len} tokens (memory-efficient attention). Excludes the CUDA "
                "context and allocator slack (add ~1-2 GiB). Computed, not measured on a GPU."
            ),
            "micro_batch_tokens": tokens_per_micro_batch,
            "rows": per_gpu,
        },
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--optimizer", choices=("auto", "standard", "in_backward"), default="auto")
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "one_billion_step.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args.seq_len, args.optimizer)), flush=True)
        return Path()

    results = []
    for name in args.configs:
        command = [sys.executable, __file__, "--child", name, "--seq_len", str(args.seq_len)]
        command += ["--optimizer", args.optimizer]
        start = time.perf_counter()
        process = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        if process.returncode != 0 or not lines:
            result = {"config": name, "error": f"exit code {process.returncode}", "stderr": process.stderr[-3000:]}
        else:
            result = json.loads(lines[-1][len("RESULT ") :])
            result["process_seconds"] = time.perf_counter() - start
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "one real training step of each 1B config on the CPU",
        "command": "python bench/one_billion_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "ram_gib": __import__("psutil").virtual_memory().total / GIB,
        },
        "results": results,
    }
    output.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
