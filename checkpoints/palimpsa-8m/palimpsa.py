"""Palimpsa attention: gated linear attention whose memory carries a precision (importance) state.

Bonnet et al., "Learning to Remember, Learn, and Forget in Attention-Based Models" (arXiv 2602.09075). Per
batch b and head h the memory is a pair of [V, K] matrices: the mean mu and the precision I (one Gaussian per
entry). Token t, with a_t = exp(log_alpha_t), updates them as

    I_t  = a_t * I_{t-1} + (1 - a_t) * Ip + beta_t (outer) k_t^2
    M_t  = a_t * (I_{t-1} * mu_{t-1}) + v_t (outer) k_t
    mu_t = M_t / I_t
    o_t  = scale * mu_t q_t

(all products elementwise except the outer products over (V, K) and the final mu_t q_t, a sum over K). A
large I makes an entry stiff, so the importance beta decides which memories stay plastic. With beta = 0 the
precision stays at the prior Ip and this is plain gated linear attention divided by Ip.

This file holds the public dispatcher `palimpsa_attention` and `palimpsa_reference`, the plain token loop
that every fast path is tested against. The chunked-parallel PyTorch path lives in `palimpsa_chunk.py`, the fused
C++ CPU loop in `palimpsa_cpu.py` (built on first use); an optional Triton path in `palimpsa_triton.py` is imported
lazily.
"""

import torch

from .palimpsa_chunk import gated_linear_attention_chunk, palimpsa_chunk
from .palimpsa_cpu import cpu_kernel_unavailable, palimpsa_cpu
from .triton_support import load_triton_kernel

IMPLS = ("auto", "reference", "chunk", "cpu", "triton")


def prior_as_tensor(prior_precision, num_heads: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The prior precision Ip as a [num_heads] tensor (a float is shared by all heads)."""
    if isinstance(prior_precision, torch.Tensor):
        if prior_precision.dim() == 0:
            prior_precision = prior_precision.expand(num_heads)
        return prior_precision.to(device=device, dtype=dtype)
    return torch.full((num_heads,), float(prior_precision), dtype=dtype, device=device)


def palimpsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    log_alpha: torch.Tensor,
    prior_precision: float | torch.Tensor = 1.0,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    output_uncertainty: bool = False,
):
    """The recurrence above, one token at a time. Same arguments and return values as `palimpsa_attention`.

    Computes in float32 (or float64 when given float64), so it is also the cheap single-step update used
    while decoding. `beta=None` means beta = 0.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    input_dtype, dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    q, k, v, log_alpha = (x.to(dtype) for x in (q, k, v, log_alpha))
    beta = torch.zeros_like(v) if beta is None else beta.to(dtype)
    prior = prior_as_tensor(prior_precision, H, dtype, q.device)[None, :, None, None]  # [1, H, 1, 1]
    if initial_state is None:
        mu = q.new_zeros(B, H, V, K)
        precision = prior.expand(B, H, V, K)
    else:
        mu, precision = (x.to(dtype) for x in initial_state)

    outputs, variances = [], []
    for t in range(T):
        a = log_alpha[:, t].exp()[:, :, None, None]  # [B, H, 1, 1]
        k_t = k[:, t, :, None, :]  # [B, H, 1, K]
        q_t = q[:, t, :, None, :]
        new_precision = a * precision + (1 - a) * prior + beta[:, t, :, :, None] * k_t**2
        numerator = a * (precision * mu) + v[:, t, :, :, None] * k_t
        mu = numerator / new_precision
        precision = new_precision
        outputs.append(scale * (mu * q_t).sum(-1))
        if output_uncertainty:
            variances.append((q_t**2 / precision).sum(-1))

    o = torch.stack(outputs, dim=1).to(input_dtype)
    final_state = (mu, precision.expand(B, H, V, K)) if output_final_state else None
    if output_uncertainty:
        return o, final_state, torch.stack(variances, dim=1).to(o.dtype)
    return o, final_state


def uses_cpu_ops(impl: str, device: torch.device) -> bool:
    """Whether the path `impl` runs the C++ CPU ops (the memory op and the layer's short convolution) for tensors on
    `device`: "cpu" always, "auto" on a CPU where they build (`cpu_kernel_unavailable()` says why not)."""
    if impl == "cpu":
        return True
    return impl == "auto" and torch.device(device).type == "cpu" and cpu_kernel_unavailable() is None


def _check_inputs(q, k, v, beta, log_alpha, prior_precision, initial_state, impl, validate) -> None:
    """Clear errors for inputs the recurrence cannot take (rather than a broadcasting error deep inside).

    Shapes and dtypes are always checked; the values (signs of prior, beta and log_alpha) only with `validate`,
    since each such check reads a reduction back to the host (a GPU synchronisation)."""
    if impl not in IMPLS:
        raise ValueError(f"`impl` must be one of {IMPLS}, got {impl!r}.")
    if q.dim() != 4:
        raise ValueError(f"`q` must be [batch, seq_len, heads, key_dim], got shape {tuple(q.shape)}.")
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"`k` must have the shape of `q` {tuple(q.shape)}, got {tuple(k.shape)}.")
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"`v` must be [batch, seq_len, heads, value_dim] = [{B}, {T}, {H}, V], got {tuple(v.shape)}.")
    if beta is not None and beta.shape != v.shape:
        raise ValueError(f"`beta` must have the shape of `v` {tuple(v.shape)}, got {tuple(beta.shape)}.")
    if log_alpha.shape != (B, T, H):
        raise ValueError(
            f"`log_alpha` must be [batch, seq_len, heads] = [{B}, {T}, {H}], got {tuple(log_alpha.shape)}."
        )
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta), ("log_alpha", log_alpha)):
        if x is not None and not x.is_floating_point():
            raise TypeError(f"`{name}` must be a floating-point tensor, got {x.dtype}.")
    if isinstance(prior_precision, torch.Tensor):
        if prior_precision.dim() > 1 or (prior_precision.dim() == 1 and prior_precision.shape[0] != H):
            raise ValueError(
                f"`prior_precision` must be a float or a [{H}] tensor, got {tuple(prior_precision.shape)}."
            )
        if validate and not torch.compiler.is_compiling() and bool((prior_precision <= 0).any()):
            raise ValueError("`prior_precision` must be > 0.")
    elif not float(prior_precision) > 0:
        raise ValueError(f"`prior_precision` must be > 0, got {prior_precision}.")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("`initial_state` must be the pair (mu, I).")
        for name, x in zip(("mu", "I"), initial_state):
            if x.shape != (B, H, v.shape[-1], K):
                raise ValueError(
                    f"`initial_state` {name} must be [batch, heads, value_dim, key_dim] = "
                    f"[{B}, {H}, {v.shape[-1]}, {K}], got {tuple(x.shape)}."
                )
    if validate and not torch.compiler.is_compiling():
        # Data checks cost one reduction each; a negative beta or a positive log_alpha can drive I to zero.
        if beta is not None and beta.numel() and bool((beta < 0).any()):
            raise ValueError("`beta` must be >= 0 (it adds precision).")
        if log_alpha.numel() and bool((log_alpha > 0).any()):
            raise ValueError("`log_alpha` must be <= 0 (alpha = exp(log_alpha) is a forgetting factor in (0, 1]).")


def _triton_kernel():
    """Imported only when asked for: the package works without Triton."""
    from .palimpsa_triton import INTERPRETED, palimpsa_attention_triton

    return INTERPRETED, palimpsa_attention_triton


def palimpsa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor | None,
    log_alpha: torch.Tensor,
    *,
    prior_precision: float | torch.Tensor = 1.0,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    output_uncertainty: bool = False,
    impl: str = "auto",
    validate: bool = True,
    precision_is_prior: bool | None = None,
):
    """Palimpsa attention (see the module docstring for the recurrence).

    Args:
        q, k: [B, T, H, K] queries and keys. v, beta: [B, T, H, V] values (already input-gated) and importances
            (>= 0). `beta=None` turns metaplasticity off: I stays at the prior and the cheaper gated-linear-attention
            path runs (when the initial precision is the prior).
        log_alpha: [B, T, H] log forgetting factors (<= 0).
        prior_precision: float or [H] tensor > 0, the precision I relaxes to. scale: defaults to K ** -0.5.
        initial_state: (mu, I), each [B, H, V, K]; defaults to mu = 0, I = prior.
        output_final_state: also return the state after the last token (float32).
        output_uncertainty: also return var_t[v] = sum_k q_t[k]^2 / I_t[v, k], the posterior variance readout.
        impl: "reference" (token loop), "chunk" (chunked-parallel PyTorch; with beta=None from the prior, gated
            linear attention in matrix products), "cpu" (fused C++ token loop, CPU tensors), "triton", or "auto":
            the token loop for a single token (decoding), else "cpu" on CPU when the C++ op builds here
            (`cpu_kernel_unavailable()` says why not), otherwise "chunk".
        validate: check the values of prior_precision, beta and log_alpha (one host read-back each). Callers
            whose gates are positive and forgetting factors at most 1 by construction (the models) pass False.
        precision_is_prior: with beta=None, whether the initial precision equals the prior, which allows the cheaper
            gated-linear-attention path; None compares them (one host read-back when an initial state is given).

    Returns:
        (o, final_state) or, with `output_uncertainty`, (o, final_state, var): o [B, T, H, V] in q's dtype,
        final_state the pair (mu, I) in float32 or None, var [B, T, H, V].
    """
    _check_inputs(q, k, v, beta, log_alpha, prior_precision, initial_state, impl, validate)
    if q.shape[1] == 0:  # nothing to read or write: the state passes through
        return _empty_result(q, v, prior_precision, initial_state, output_final_state, output_uncertainty)
    if impl == "auto":
        impl = "reference" if q.shape[1] == 1 else "cpu" if uses_cpu_ops("auto", q.device) else "chunk"
    arguments = (
        q,
        k,
        v,
        beta,
        log_alpha,
        prior_precision,
        scale,
        initial_state,
        output_final_state,
        output_uncertainty,
    )
    if impl == "triton":
        if beta is None:  # the Triton contract always takes a beta; zero importance is the same recurrence
            arguments = (q, k, v, torch.zeros_like(v), *arguments[4:])
        return load_triton_kernel(_triton_kernel, q.device, 'impl="triton"')(*arguments)
    # The state accumulates in float32 whatever autocast would pick for the matrix products inside.
    with torch.autocast(q.device.type, enabled=False):
        if impl == "reference":
            return palimpsa_reference(*arguments)
        if precision_is_prior is None:
            precision_is_prior = beta is None and _precision_is_prior(initial_state, prior_precision)
        # beta = 0 with the precision at the prior: I never moves, so this is gated linear attention divided by Ip,
        # which the C++ loop runs in its cheap mode (only the numerator moves) and the chunked path in matrix products
        # (without the uncertainty readout). Any other beta = 0 needs the full recurrence.
        linear = beta is None and precision_is_prior
        if beta is None and not (linear and (impl == "cpu" or not output_uncertainty)):
            beta = torch.zeros_like(v)
            arguments = (q, k, v, beta, *arguments[4:])
        if impl == "cpu":
            return palimpsa_cpu(*arguments)
        if beta is None:
            return gated_linear_attention_chunk(
                q, k, v, log_alpha, prior_precision, scale, initial_state, output_final_state
            )
        return palimpsa_chunk(*arguments)


def _empty_result(q, v, prior_precision, initial_state, output_final_state, output_uncertainty):
    B, _, H, K = q.shape
    final_state = None
    if output_final_state:
        if initial_state is None:
            prior = prior_as_tensor(prior_precision, H, torch.float32, q.device)[None, :, None, None]
            final_state = (q.new_zeros(B, H, v.shape[-1], K, dtype=torch.float32), prior.expand(B, H, v.shape[-1], K))
        else:
            final_state = tuple(x.float() for x in initial_state)
    o = q.new_zeros(v.shape)
    return (o, final_state, torch.zeros_like(o)) if output_uncertainty else (o, final_state)


def _precision_is_prior(initial_state, prior_precision) -> bool:
    """True when the starting precision equals the prior, so I stays at the prior while beta = 0 (and nobody
    asks how the output depends on that starting precision)."""
    if initial_state is None:
        return True
    precision = initial_state[1]
    if precision.requires_grad and torch.is_grad_enabled():
        return False
    prior = prior_as_tensor(prior_precision, precision.shape[1], precision.dtype, precision.device)
    return bool((precision == prior[None, :, None, None]).all())


__all__ = ["palimpsa_attention", "palimpsa_reference", "uses_cpu_ops"]
