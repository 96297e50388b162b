"""Palimpsa as one fused C++ token loop per (batch, head): the fast CPU path (source and maths: palimpsa_cpu.cpp).

The ops are compiled from `palimpsa_cpu.cpp` once, on first use, by torch's C++ extension loader (cached by torch
under $TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, and rebuilt when the source changes).
`cpu_kernel_unavailable()` says why they cannot be used here (no compiler or ninja, a failed build, the source
missing beside a remote-code copy); `palimpsa_attention(impl="auto")` then takes the chunked PyTorch path, which
computes the same thing.
"""

import hashlib
import platform
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("palimpsa_cpu.cpp")
LIBRARY = "amformers_palimpsa_cpu"
# The forward keeps the state every CHECKPOINT_EVERY tokens; the backward recomputes the states in between.
CHECKPOINT_EVERY = 64

_lock = threading.Lock()
_loaded: dict[str, str | None] = {}  # "error" -> None once built and loaded, else why not


def cpu_kernel_unavailable() -> str | None:
    """None if the C++ op is loaded (building it the first time), else the reason it cannot be. Decided once per
    process, on the first eager call: a trace (torch.compile, torch.export) only reads the decision."""
    if "error" not in _loaded:
        if torch.compiler.is_compiling():
            return "it is built on the first eager call, not while tracing"
        with _lock:
            if "error" not in _loaded:
                _loaded["error"] = _build()
    return _loaded["error"]


def _build() -> str | None:
    if hasattr(getattr(torch.ops, LIBRARY), "forward"):
        return None  # loaded by another copy of this module (e.g. the package beside a remote-code copy)
    if not SOURCE.is_file():
        return f"its C++ source {SOURCE.name} is not beside {Path(__file__).name}"
    # ATen's parallel_for is OpenMP pragmas in its header: without -fopenmp they compile away and the ops run on one
    # thread whatever torch.get_num_threads() says. A compiler without OpenMP (Apple's clang) still gets the fused
    # single-threaded loop, under its own library name.
    errors = []
    for suffix, openmp in (("", "-fopenmp"), ("_serial", "-fopenmp-simd")):
        try:
            from torch.utils.cpp_extension import load  # needs setuptools: a missing one is one more reason

            load(
                name=f"{LIBRARY}_{_cpu_tag()}{suffix}",
                sources=[str(SOURCE)],
                extra_cflags=["-O3", "-march=native", openmp],
                extra_ldflags=[openmp] if openmp == "-fopenmp" else [],
                is_python_module=False,
                verbose=False,
            )
        except Exception as error:  # no compiler, ninja or OpenMP, a compile error: try the next, else PyTorch's path
            errors.append(f"{type(error).__name__}: {str(error).strip()[-500:]}")
            continue
        _register_fakes()
        return None
    return f"building {SOURCE.name} failed: {errors[0]}"


def cpu_kernel_threads() -> int:
    """How many threads the C++ ops run on at torch's current setting: torch.get_num_threads() where the build
    has OpenMP, 1 where it does not."""
    _require_cpu_ops()
    return getattr(torch.ops, LIBRARY).parallel_threads(1024)


def _require_cpu_ops() -> None:
    reason = cpu_kernel_unavailable()
    if reason is not None:
        raise RuntimeError(f"The Palimpsa C++ CPU ops are unavailable: {reason}. Use impl='chunk' instead.")


def _cpu_tag() -> str:
    """The build uses this CPU's instruction set (-march=native), so the cached library is named after it: a home
    folder shared by machines with different CPUs then holds one build per CPU instead of crashing on the others."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {platform.processor()} {flags}".encode()).hexdigest()[:10]


def _register_fakes() -> None:
    """Shapes of the ops' outputs for torch.compile / torch.export tracing (the ops run only on real tensors)."""

    @torch.library.register_fake(f"{LIBRARY}::forward")
    def _forward(q, k, v, beta, log_alpha, prior, initial, scale, want_var, chunk):
        B, T, H, K = q.shape
        V = v.shape[-1]
        starts = q.new_empty(B * H, (T + chunk - 1) // chunk, 2, K, V)
        var = v.new_empty(B, T, H, V) if want_var else v.new_empty(0)
        return v.new_empty(B, T, H, V), var, starts, initial.new_empty(initial.shape)

    @torch.library.register_fake(f"{LIBRARY}::backward")
    def _backward(q, k, v, beta, log_alpha, prior, starts, d_o, d_var, d_final, scale, chunk):
        return tuple(x.new_empty(x.shape) for x in (q, k, v, beta, log_alpha, prior, d_final))

    @torch.library.register_fake(f"{LIBRARY}::causal_conv_forward")
    def _conv_forward(x, weight, bias):
        return x.new_empty(x.shape[0], x.shape[1] - weight.shape[0] + 1, x.shape[2])

    @torch.library.register_fake(f"{LIBRARY}::causal_conv_backward")
    def _conv_backward(x, weight, d_z):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), x.new_empty(weight.shape[1])


class PalimpsaCpuFunction(torch.autograd.Function):
    """The C++ forward and backward on [B, T, H, X] contiguous tensors; the state (M, E) as [B*H, 2, V, K]."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, prior, initial, scale, want_var):
        ops = getattr(torch.ops, LIBRARY)
        # The op keeps the state transposed, [B*H, 2, K, V] (see palimpsa_cpu.cpp).
        initial = initial.transpose(-1, -2).contiguous()
        o, var, starts, final = ops.forward(q, k, v, beta, log_alpha, prior, initial, scale, want_var, CHECKPOINT_EVERY)
        ctx.save_for_backward(q, k, v, beta, log_alpha, prior, starts)
        ctx.scale, ctx.want_var = scale, want_var
        return o, var, final.transpose(-1, -2)

    @staticmethod
    def backward(ctx, d_o, d_var, d_final):
        q, k, v, beta, log_alpha, prior, starts = ctx.saved_tensors
        d_var = d_var.contiguous() if ctx.want_var else d_var.new_empty(0)
        d_final = d_final.transpose(-1, -2).contiguous()
        grads = getattr(torch.ops, LIBRARY).backward(
            q, k, v, beta, log_alpha, prior, starts, d_o.contiguous(), d_var, d_final, ctx.scale, CHECKPOINT_EVERY
        )
        dq, dk, dv, dbeta, dlog_alpha, dprior, d_initial = grads
        return dq, dk, dv, dbeta, dlog_alpha, dprior, d_initial.transpose(-1, -2), None, None


class CausalConvCpuFunction(torch.autograd.Function):
    """The depthwise causal convolution in C++, one pass forward and one backward (palimpsa_cpu.cpp); weight
    [W, C] (taps first)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias.numel() > 0
        return getattr(torch.ops, LIBRARY).causal_conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, d_z):
        x, weight = ctx.saved_tensors
        d_x, d_weight, d_bias = getattr(torch.ops, LIBRARY).causal_conv_backward(x, weight, d_z.contiguous())
        return d_x, d_weight, d_bias if ctx.has_bias else None


def causal_conv_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """SiLU(z), z[b, t, c] = bias[c] + sum_i weight[c, i] x[b, t + i, c]: x [B, T + W - 1, C] (the W - 1 inputs
    before the first output, then the new ones), weight [C, W], bias [C] or None; returns [B, T, C] in x's dtype
    (computed in float32, or float64 for float64). The convolution runs in C++; SiLU is PyTorch's."""
    _require_cpu_ops()
    dtype = torch.promote_types(x.dtype, torch.float32)
    bias = x.new_empty(0, dtype=dtype) if bias is None else bias.to(dtype).contiguous()
    z = CausalConvCpuFunction.apply(x.to(dtype).contiguous(), weight.to(dtype).t().contiguous(), bias)
    return torch.nn.functional.silu(z).to(x.dtype)


def palimpsa_cpu(
    q,
    k,
    v,
    beta,
    log_alpha,
    prior_precision=1.0,
    scale=None,
    initial_state=None,
    output_final_state=False,
    output_uncertainty=False,
):
    """Palimpsa through the C++ op; arguments and return values as `palimpsa_attention`, all tensors on the CPU.
    `beta=None` is gated linear attention divided by Ip (beta = 0 with the precision at the prior throughout, as
    `gated_linear_attention_chunk`: an initial state contributes its numerator I_0 mu_0, and the final precision is
    the prior). Raises RuntimeError with the reason when the op cannot be built here."""
    _require_cpu_ops()
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("log_alpha", log_alpha)):
        if x is not None and x.device.type != "cpu":
            raise ValueError(f"The Palimpsa C++ op runs on the CPU; `{name}` is on {x.device}. Use impl='chunk'.")
    B, T, H, K = q.shape
    V = v.shape[-1]
    input_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v, log_alpha = (x.to(dtype).contiguous() for x in (q, k, v, log_alpha))
    beta = q.new_empty(0) if beta is None else beta.to(dtype).contiguous()  # empty: metaplasticity off
    if isinstance(prior_precision, torch.Tensor):
        prior = prior_precision.to(dtype).expand(H)
    else:
        prior = torch.full((H,), float(prior_precision), dtype=dtype)
    prior = prior.expand(B, H).reshape(B * H).contiguous()
    if initial_state is None:
        initial = q.new_zeros(B * H, 2, V, K)
    else:  # M_0 = I_0 mu_0, E_0 = I_0 - Ip; autograd carries the gradients back to (mu_0, I_0) and Ip
        mu0, precision0 = (x.to(dtype).reshape(B * H, V, K) for x in initial_state)
        excess = precision0 - prior[:, None, None] if beta.numel() else torch.zeros_like(precision0)
        initial = torch.stack([precision0 * mu0, excess], dim=1).contiguous()
    scale = K**-0.5 if scale is None else float(scale)
    o, var, final = PalimpsaCpuFunction.apply(q, k, v, beta, log_alpha, prior, initial, scale, output_uncertainty)
    final_state = None
    if output_final_state:
        final_I = final[:, 1] + prior[:, None, None]
        final_state = ((final[:, 0] / final_I).reshape(B, H, V, K), final_I.reshape(B, H, V, K))
    o, var = o.to(input_dtype), var.to(input_dtype)
    return (o, final_state, var) if output_uncertainty else (o, final_state)


__all__ = ["causal_conv_cpu", "cpu_kernel_threads", "cpu_kernel_unavailable", "palimpsa_cpu"]
