"""Palimpsa speed on this CPU, each number against a peer measured in the same run.

    python bench/palimpsa_speed.py            # writes bench/results/palimpsa_speed.json

1. Training tokens/s (AdamW, forward + backward + step, fp32, batch 4 x 1024 tokens) of Palimpsa
   (metaplastic and not) against transformers' Mamba2ForCausalLM (its PyTorch path) at ~8M parameters.
   Goal: Palimpsa >= 1.5x Mamba2.
2. The op alone, forward + backward at T = 2048 (one layer's shape, batch 1): chunked (and the fused C++ loop,
   where it builds) against the token-loop reference. Goal: >= 20x.
3. Decoding ms/token at contexts of 128, 2k and 16k tokens, Palimpsa against AttnStream of the same size
   (batch 1, one token per step with the cache), and the cache bytes at 16k. Goal: Palimpsa flat
   (16k / 128 <= 1.1).

Background load on the shared machine hurts everyone alike: the contenders take turns, `--rounds` times,
and each one's best round counts.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM, logging

from amformers import AttnStreamConfig, AttnStreamForCausalLM, PalimpsaConfig, PalimpsaForCausalLM
from amformers.modeling.compat import CACHE_NAME
from amformers.modeling.kernels import palimpsa_attention

logging.set_verbosity_error()  # Mamba2's "falling back to the PyTorch implementation" notes

VOCAB = 8192
PALIMPSA_SHAPE = dict(
    vocab_size=VOCAB, hidden_size=256, num_hidden_layers=8, num_heads=4, head_dim=32, expand_v=2,
    intermediate_size=688, tie_word_embeddings=True,
)  # fmt: skip
MAMBA2_SHAPE = dict(
    vocab_size=VOCAB, hidden_size=256, num_hidden_layers=15, num_heads=8, head_dim=64, state_size=64, expand=2,
    n_groups=1, chunk_size=256, tie_word_embeddings=True,
)  # fmt: skip
ATTN_STREAM_SHAPE = dict(
    vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=16, max_position_embeddings=16384 + 256, tie_word_embeddings=True,
)  # fmt: skip

TRAINING = {
    "mamba2 (transformers, torch path)": lambda: Mamba2ForCausalLM(Mamba2Config(**MAMBA2_SHAPE)),
    "palimpsa (metaplastic)": lambda: PalimpsaForCausalLM(PalimpsaConfig(**PALIMPSA_SHAPE)),
    "not_palimpsa (metaplastic=False)": lambda: PalimpsaForCausalLM(
        PalimpsaConfig(**PALIMPSA_SHAPE, metaplastic=False)
    ),
}


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_training(batch: int, seq_len: int, steps: int, rounds: int) -> dict:
    batches = [torch.randint(0, VOCAB, (batch, seq_len)) for _ in range(steps)]
    models, optimizers, best, best_cpu = {}, {}, {}, {}
    for name, build in TRAINING.items():
        torch.manual_seed(0)
        models[name] = build().train()
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
        best[name] = best_cpu[name] = float("inf")

    def step(name, x):
        loss = models[name](input_ids=x, labels=x).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return loss.item()

    for name in TRAINING:  # warm-up step (allocations, first-call overheads)
        step(name, batches[0])
    for round_ in range(rounds):
        for name in TRAINING:
            start, start_cpu = time.perf_counter(), time.process_time()
            for x in batches:
                step(name, x)
            best[name] = min(best[name], (time.perf_counter() - start) / steps)
            best_cpu[name] = min(best_cpu[name], (time.process_time() - start_cpu) / steps)
            print(
                f"  training round {round_}: {name}: {batch * seq_len / best[name]:.0f} tok/s (best so far)", flush=True
            )
    peer = "mamba2 (transformers, torch path)"
    return {
        name: {
            "parameters": parameters(models[name]),
            "seconds_per_step": best[name],
            "tokens_per_second": batch * seq_len / best[name],
            "speed_vs_mamba2": best[peer] / best[name],
            # CPU time (all threads) per step: less sensitive to other processes sharing the cores
            "cpu_seconds_per_step": best_cpu[name],
            "cpu_speed_vs_mamba2": best_cpu[peer] / best_cpu[name],
        }
        for name in TRAINING
    }


def op_inputs(B, T, H, K, V, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, V, generator=g)
    log_alpha = -torch.rand(B, T, H, generator=g) * 0.2
    return [x.requires_grad_(True) for x in (q, k, v, beta, log_alpha)]


def bench_op(seq_len: int, rounds: int, reference_rounds: int) -> dict:
    H, K, V = PALIMPSA_SHAPE["num_heads"], PALIMPSA_SHAPE["head_dim"], PALIMPSA_SHAPE["head_dim"] * 2
    inputs = op_inputs(1, seq_len, H, K, V)
    upstream = torch.randn(1, seq_len, H, V)

    def timed(impl):
        start, start_cpu = time.perf_counter(), time.process_time()
        o, _ = palimpsa_attention(*inputs, impl=impl)
        torch.autograd.grad(o, inputs, upstream)
        return time.perf_counter() - start, time.process_time() - start_cpu

    from amformers.modeling.kernels.palimpsa_cpu import cpu_kernel_unavailable

    fast = ["chunk"] + (["cpu"] if cpu_kernel_unavailable() is None else [])
    for impl in fast:
        timed(impl)
    best = {impl: (float("inf"),) * 2 for impl in [*fast, "reference"]}
    for round_ in range(max(rounds, reference_rounds)):
        for impl in best:
            if round_ < (rounds if impl != "reference" else reference_rounds):
                best[impl] = tuple(min(a, b) for a, b in zip(best[impl], timed(impl)))
        print(f"  op round {round_}: {best}", flush=True)
    result = {
        "shape": {"B": 1, "T": seq_len, "H": H, "K": K, "V": V},
        "chunk_seconds": best["chunk"][0],
        "reference_seconds": best["reference"][0],
        "speedup": best["reference"][0] / best["chunk"][0],
        "chunk_cpu_seconds": best["chunk"][1],
        "reference_cpu_seconds": best["reference"][1],
        "cpu_speedup": best["reference"][1] / best["chunk"][1],
    }
    if "cpu" in best:  # the fused C++ loop (impl="cpu"), what impl="auto" runs on CPU when it builds
        result |= {
            "cpp_seconds": best["cpu"][0],
            "cpp_speedup": best["reference"][0] / best["cpu"][0],
            "cpp_over_chunk": best["chunk"][0] / best["cpu"][0],
        }
    return result


@torch.no_grad()
def bench_decoding(contexts: list[int], decode_steps: int, rounds: int) -> dict:
    torch.manual_seed(0)
    models = {
        "palimpsa": PalimpsaForCausalLM(PalimpsaConfig(**PALIMPSA_SHAPE)).eval(),
        "attn_stream": AttnStreamForCausalLM(AttnStreamConfig(**ATTN_STREAM_SHAPE)).eval(),
    }
    models["attn_stream"].set_attn_implementation("sdpa")
    results = {name: {"parameters": parameters(model), "ms_per_token": {}} for name, model in models.items()}
    for context in contexts:
        prompt = torch.randint(0, VOCAB, (1, context))
        for name, model in models.items():
            cache = None
            for start in range(0, context, 256):  # prefill in pieces: bounded attention memory
                out = model(prompt[:, start : start + 256], **{CACHE_NAME: cache}, use_cache=True)
                cache = getattr(out, CACHE_NAME)
            tokens = torch.randint(0, VOCAB, (decode_steps,))
            best = float("inf")
            for _ in range(rounds):  # the cache keeps growing by decode_steps per round: negligible here
                start = time.perf_counter()
                for t in tokens:
                    cache = getattr(model(t.view(1, 1), **{CACHE_NAME: cache}, use_cache=True), CACHE_NAME)
                best = min(best, (time.perf_counter() - start) / decode_steps)
            results[name]["ms_per_token"][str(context)] = 1e3 * best
            if context == max(contexts):
                results[name]["cache_bytes_at_max_context"] = cache_bytes(cache)
            print(f"  decode {name} at {context}: {1e3 * best:.2f} ms/token", flush=True)
            del cache
    for result in results.values():
        times = result["ms_per_token"]
        result["growth_max_over_min_context"] = times[str(max(contexts))] / times[str(min(contexts))]
    return results


def cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--op_seq_len", type=int, default=2048)
    parser.add_argument("--reference_rounds", type=int, default=1, help="the token loop is slow: fewer rounds")
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 2048, 16384])
    parser.add_argument("--decode_steps", type=int, default=32)
    parser.add_argument("--only", choices=["training", "op", "decoding"], nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "palimpsa_speed.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.only or ["training", "op", "decoding"]
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    if "training" in parts:
        print("training", flush=True)
        result["training"] = {
            "batch": args.batch,
            "seq_len": args.seq_len,
            "models": bench_training(args.batch, args.seq_len, args.steps, args.rounds),
        }
    if "op" in parts:
        print("op", flush=True)
        result["op"] = bench_op(args.op_seq_len, args.rounds, args.reference_rounds)
    if "decoding" in parts:
        print("decoding", flush=True)
        result["decoding"] = bench_decoding(args.contexts, args.decode_steps, args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
