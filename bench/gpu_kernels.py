"""GPU timings of the Triton kernels behind attn_implementation="amformers_triton", against their PyTorch paths.

    python bench/gpu_kernels.py                  # on a CUDA machine; writes bench/results/gpu_kernels.json

At 1B-model shapes (bf16 by default), in one run:
* AttnStream flash attention with the value-stream mix fused, forward and forward+backward, against the model's
  PyTorch path (the mix in PyTorch, then SDPA, which dispatches to FlashAttention/cuDNN on GPU) and plain SDPA
  without a mix (the floor: attention alone);
* the Palimpsa chunked scan, forward and forward+backward, against `palimpsa_attention(impl="chunk")` (PyTorch) and,
  if flash-linear-attention is installed, its `chunk_simple_gla` on the same q/k/v (the same state size without
  the precision state: what Palimpsa's elementwise division costs);
* the Palimpsa fused recurrent step (one decoding token) against the PyTorch single-step update.
Each row gives milliseconds (median of triton.testing.do_bench), the ratio to its PyTorch peer, and achieved
FLOP/s and bytes/s from the analytic counts in each kernel file's header, as fractions of the device peaks
measured in the same run (bf16 tensor-core matmul, fp32 matmul without TF32, device-to-device copy bandwidth).

Without a CUDA GPU the script refuses and exits with status 2: on a CPU the kernels only run in Triton's
interpreter, where a timing means nothing. `--interpret-smoke-test` (development only) runs every code path on
tiny CPU shapes under TRITON_INTERPRET=1 to check the script itself; it measures nothing and writes no JSON.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

# 1B-class shapes. AttnStream: Llama-3.2-1B attention (32 query heads, 8 kv heads, head_dim 64) and a head_dim-128
# variant; Palimpsa: the paper's 1.3B layout with halved key dim (16 heads, K = 64, V = 128).
ATTENTION_SHAPES = [
    dict(batch=4, seq_len=2048, q_heads=32, kv_heads=8, head_dim=64),
    dict(batch=2, seq_len=4096, q_heads=16, kv_heads=16, head_dim=128),
]
PALIMPSA_SHAPES = [dict(batch=4, seq_len=2048, heads=16, key_dim=64, value_dim=128)]
SMOKE_ATTENTION_SHAPES = [dict(batch=1, seq_len=24, q_heads=2, kv_heads=1, head_dim=16)]
SMOKE_PALIMPSA_SHAPES = [dict(batch=1, seq_len=12, heads=1, key_dim=8, value_dim=8)]


def refuse(message: str) -> None:
    print(f"bench/gpu_kernels.py: {message}", file=sys.stderr)
    sys.exit(2)


# ------------------------------------------------------------------------------------------------ analytic counts


def attention_counts(batch, seq_len, q_heads, kv_heads, head_dim, element_bytes, backward):
    """Causal attention FLOPs (the usual 4 T^2 D / 2 per head forward, 2.5x that backward) and minimal HBM bytes."""
    forward_flops = 4 * batch * q_heads * seq_len * seq_len * head_dim / 2
    q_bytes = batch * seq_len * q_heads * head_dim * element_bytes
    kv_bytes = batch * seq_len * kv_heads * head_dim * element_bytes
    forward_bytes = 2 * q_bytes + 3 * kv_bytes + 4 * batch * q_heads * seq_len  # q, o, k, v, source, lse
    if not backward:
        return forward_flops, forward_bytes
    backward_bytes = 4 * q_bytes + 6 * kv_bytes + 8 * batch * q_heads * seq_len  # q,o,do,dq; k,v,src,dk,dv,dsrc
    return 3.5 * forward_flops, forward_bytes + backward_bytes


def palimpsa_counts(batch, seq_len, heads, key_dim, value_dim, element_bytes, backward, chunk=16, tile=16):
    """The per-token-head counts of palimpsa_triton.py's header, times tokens and heads."""
    tokens = batch * seq_len * heads
    state = key_dim * value_dim
    inputs = element_bytes * (2 * key_dim + 2 * value_dim) + 4
    flops = 25 * state
    bytes_ = inputs + element_bytes * value_dim + 2 * 4 * value_dim * math.ceil(key_dim / tile) + 8 * state / chunk
    if backward:
        flops += 60 * state
        partials = 2 * 4 * (2 * key_dim * math.ceil(value_dim / tile) + 2 * value_dim * math.ceil(key_dim / tile))
        bytes_ += inputs + element_bytes * value_dim + 8 * state / chunk + partials
    return tokens * flops, tokens * bytes_


def step_counts(batch, heads, key_dim, value_dim, element_bytes):
    """One decoding token: ~10 K V FLOPs; the fp32 state (mu, I) read and written once."""
    return batch * heads * 10 * key_dim * value_dim, batch * heads * (
        16 * key_dim * value_dim + element_bytes * (2 * key_dim + 3 * value_dim)
    )


# ------------------------------------------------------------------------------------------------------- timing


def make_timer(smoke: bool):
    if smoke:

        def timer(fn):
            start = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - start)

        return timer
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measured_peaks(timer, smoke: bool) -> dict:
    """Achievable peaks on this device, measured now: bf16 matmul, fp32 matmul (TF32 off), copy bandwidth."""
    if smoke:
        return dict(bf16_matmul_flops=1.0, fp32_flops=1.0, copy_bytes_per_s=1.0)
    n = 8192
    a, b = (
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
        torch.randn(n, n, device="cuda", dtype=torch.bfloat16),
    )
    bf16 = 2 * n**3 / (timer(lambda: a @ b) / 1e3)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    a32, b32 = a.float()[:4096, :4096], b.float()[:4096, :4096]
    fp32 = 2 * 4096**3 / (timer(lambda: a32 @ b32) / 1e3)
    torch.backends.cuda.matmul.allow_tf32 = previous
    src = torch.empty(2**28, device="cuda", dtype=torch.uint8)  # 256 MiB
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / (timer(lambda: dst.copy_(src)) / 1e3)
    return dict(bf16_matmul_flops=bf16, fp32_flops=fp32, copy_bytes_per_s=copy)


def row(name, shape, ms, flops, bytes_, peer_ms=None, flop_peak=None, peaks=None):
    seconds = ms / 1e3
    result = dict(kernel=name, shape=shape, ms=round(ms, 4), tflops=round(flops / seconds / 1e12, 3))
    result["gbytes_per_s"] = round(bytes_ / seconds / 1e9, 1)
    if peer_ms is not None:
        result["speedup_vs_peer"] = round(peer_ms / ms, 3)
    if peaks is not None and flop_peak is not None:
        result["fraction_of_flop_peak"] = round(flops / seconds / peaks[flop_peak], 3)
        result["fraction_of_bandwidth"] = round(bytes_ / seconds / peaks["copy_bytes_per_s"], 3)
        result["flop_peak_used"] = flop_peak
    return result


# ------------------------------------------------------------------------------------------------------- benches


def bench_attention(shape, dtype, device, timer, peaks, results):
    import torch.nn.functional as F

    from amformers.modeling.kernels.attn_stream_triton import attn_stream_flash_attention

    B, T, Hq, Hkv, D = (shape[k] for k in ("batch", "seq_len", "q_heads", "kv_heads", "head_dim"))
    make = lambda heads: torch.randn(B, T, heads, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()  # noqa: E731
    q, k, v, source = make(Hq), make(Hkv), make(Hkv), make(Hkv)
    weights = torch.tensor([[0.5] * Hkv, [0.5] * Hkv], device=device, requires_grad=True)
    scale = D**-0.5
    size = torch.finfo(dtype).bits // 8

    def triton_fused():
        return attn_stream_flash_attention(
            q, k, v, None, scale=scale, causal=True, stream="values", source_projection=source, stream_weights=weights
        )

    def pytorch_path():  # the model's default: mix in PyTorch, then SDPA
        w = weights.to(dtype)[:, None, :, None, None]
        mixed = w[0] * v + w[1] * source
        return F.scaled_dot_product_attention(q, k, mixed, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)

    def sdpa_alone():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=Hq != Hkv)

    for backward in (False, True):
        flops, bytes_ = attention_counts(B, T, Hq, Hkv, D, size, backward)
        timings = {}
        for name, fn in (("pytorch mix + sdpa", pytorch_path), ("sdpa, no mix", sdpa_alone), ("triton", triton_fused)):
            if backward:
                grad = torch.randn(B, T, Hq, D, device=device, dtype=dtype)

                def run(fn=fn, grad=grad):
                    out = fn()
                    out = out if out.shape == grad.shape else out.transpose(1, 2)
                    out.backward(grad)

            else:

                def run(fn=fn):
                    with torch.no_grad():
                        fn()

            timings[name] = timer(run)
        peer = timings["pytorch mix + sdpa"]
        label = "fwd+bwd" if backward else "fwd"
        for name, ms in timings.items():
            results.append(
                row(f"attn_stream {label}: {name}", shape, ms, flops, bytes_, peer, "bf16_matmul_flops", peaks)
            )


def bench_palimpsa(shape, dtype, device, timer, peaks, results):
    from amformers.modeling.kernels.palimpsa import palimpsa_attention
    from amformers.modeling.kernels.palimpsa_triton import palimpsa_recurrent_step_triton

    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # not installed (or not importable here): that column is left out
        chunk_simple_gla = None
    B, T, H, K, V = (shape[k] for k in ("batch", "seq_len", "heads", "key_dim", "value_dim"))
    gen = dict(device=device, dtype=dtype)
    q = torch.randn(B, T, H, K, **gen).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, **gen), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, V, **gen).requires_grad_()
    beta = torch.rand(B, T, H, V, **gen).requires_grad_()
    log_alpha = torch.log(torch.rand(B, T, H, device=device) * 0.5 + 0.5).requires_grad_()
    size = torch.finfo(dtype).bits // 8

    candidates = {
        "pytorch chunk": lambda: palimpsa_attention(q, k, v, beta, log_alpha, impl="chunk")[0],
        "triton": lambda: palimpsa_attention(q, k, v, beta, log_alpha, impl="triton")[0],
    }
    if chunk_simple_gla is not None:
        candidates["fla chunk_simple_gla (no precision state)"] = lambda: chunk_simple_gla(
            q, k, v, g=log_alpha, scale=K**-0.5
        )[0]
    for backward in (False, True):
        flops, bytes_ = palimpsa_counts(B, T, H, K, V, size, backward)
        timings = {}
        for name, fn in candidates.items():
            if backward:
                grad = torch.randn(B, T, H, V, **gen)
                run = lambda fn=fn, grad=grad: fn().backward(grad)  # noqa: E731
            else:

                def run(fn=fn):
                    with torch.no_grad():
                        fn()

            timings[name] = timer(run)
        peer = timings["pytorch chunk"]
        label = "fwd+bwd" if backward else "fwd"
        for name, ms in timings.items():
            results.append(row(f"palimpsa {label}: {name}", shape, ms, flops, bytes_, peer, "fp32_flops", peaks))

    # One decoding token with the state in place, against the PyTorch single step (impl="reference" at T = 1).
    state = (torch.randn(B, H, V, K, device=device), 1 + torch.rand(B, H, V, K, device=device))
    one = [x[:, :1].detach().contiguous() for x in (q, k, v, beta, log_alpha)]
    flops, bytes_ = step_counts(B, H, K, V, size)
    with torch.no_grad():
        peer = timer(lambda: palimpsa_attention(*one, initial_state=state, output_final_state=True, impl="reference"))
        mine = timer(lambda: palimpsa_recurrent_step_triton(*one, state))
    results.append(row("palimpsa decode step: pytorch", shape, peer, flops, bytes_, peer, "fp32_flops", peaks))
    results.append(row("palimpsa decode step: triton", shape, mine, flops, bytes_, peer, "fp32_flops", peaks))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_kernels.json"))
    parser.add_argument("--interpret-smoke-test", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = args.interpret_smoke_test

    if smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            refuse("--interpret-smoke-test needs TRITON_INTERPRET=1 in the environment.")
        device, dtype = "cpu", torch.float32
        attention_shapes, palimpsa_shapes = SMOKE_ATTENTION_SHAPES, SMOKE_PALIMPSA_SHAPES
    else:
        if not torch.cuda.is_available():
            refuse(
                "this benchmark times Triton kernels and needs a CUDA GPU, but torch.cuda.is_available() is False "
                "on this machine. Nothing was measured. (Kernel correctness on CPU is proven by "
                "tests/test_triton_kernels.py in Triton's interpreter.)"
            )
        try:
            import triton  # noqa: F401
        except ImportError:
            refuse("Triton is not installed: pip install 'amformers[kernels]'.")
        device, dtype = "cuda", getattr(torch, args.dtype)
        attention_shapes, palimpsa_shapes = ATTENTION_SHAPES, PALIMPSA_SHAPES

    torch.manual_seed(0)
    timer = make_timer(smoke)
    peaks = measured_peaks(timer, smoke)
    results = []
    for shape in attention_shapes:
        bench_attention(shape, dtype, device, timer, peaks, results)
    for shape in palimpsa_shapes:
        bench_palimpsa(shape, dtype, device, timer, peaks, results)

    print(f"{'kernel':<62} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'vs peer':>8} {'%peak':>6} {'%bw':>5}")
    for r in results:
        print(
            f"{r['kernel']:<62} {r['ms']:>9.3f} {r['tflops']:>8.2f} {r['gbytes_per_s']:>8.0f} "
            f"{r.get('speedup_vs_peer', float('nan')):>8.2f} {100 * r.get('fraction_of_flop_peak', 0):>5.1f}% "
            f"{100 * r.get('fraction_of_bandwidth', 0):>4.0f}%"
        )
    if smoke:
        print("(interpreter smoke test: the numbers above are meaningless; no JSON written)")
        return
    report = dict(
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        dtype=args.dtype,
        machine=dict(
            gpu=torch.cuda.get_device_name(),
            torch=torch.__version__,
            triton=__import__("triton").__version__,
            host=platform.node(),
        ),
        measured_peaks={k: float(f"{v:.4g}") for k, v in peaks.items()},
        results=results,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
