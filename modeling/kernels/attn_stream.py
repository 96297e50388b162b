"""AttnStream attention in plain PyTorch: the reference twin of the Triton kernel in `attn_stream_triton.py`.

    x_mixed = w_own[h] * x + w_src[h] * x_src      for the streamed one of x in {q, k, v}, head by head
    o = softmax(scale * q k^T  masked by (bottom-right causal) AND attention_mask) v

Importable without Triton. The kernel and this reference share `check_attention_inputs`, so both refuse the same
inputs with the same messages; tests/triton_interpreter_cases.py holds their outputs and gradients equal.
"""

import math

import torch

# Which projection a stream mixes into (None: no mix); the codes are the kernel's compile-time MIX constant.
STREAM_CODES = {None: 0, "queries": 1, "keys": 2, "values": 3}


def check_attention_inputs(q, k, v, attention_mask, stream, source_projection, stream_weights):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [batch, heads, seq, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    B, H_Q, T_Q, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [batch={B}, kv_heads, seq, {D}].")
    if H_Q % k.shape[1] != 0:
        raise ValueError(f"query heads ({H_Q}) must be a multiple of key/value heads ({k.shape[1]}).")
    if not 16 <= D <= 128:
        raise ValueError(f"head_dim {D} is outside the 16-128 the amformers_triton kernel supports; use 'sdpa'.")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp32/fp16/bf16; got {q.dtype}, {k.dtype}, {v.dtype}.")
    if attention_mask is not None:
        if attention_mask.dtype != torch.bool:
            raise ValueError(
                "amformers_triton takes a boolean attention mask (True = attend), as transformers' sdpa_mask builds; "
                f"got {attention_mask.dtype}. Additive float masks (biases) need attn_implementation='eager'."
            )
        if attention_mask.dim() != 4 or attention_mask.shape[-2:] != (T_Q, k.shape[2]):
            raise ValueError(
                f"attention_mask must be [batch, 1 or heads, {T_Q}, {k.shape[2]}]; got {tuple(attention_mask.shape)}."
            )
    if stream not in STREAM_CODES:
        raise ValueError(f"stream must be one of {list(STREAM_CODES)}, got {stream!r}.")
    if stream is not None:
        own = {"queries": q, "keys": k, "values": v}[stream]
        if source_projection is None or source_projection.shape != own.shape:
            got = None if source_projection is None else tuple(source_projection.shape)
            raise ValueError(f"the {stream} stream source must have the {stream} shape {tuple(own.shape)}; got {got}.")
        if source_projection.dtype != own.dtype or source_projection.device != own.device:
            raise ValueError("the stream source must share the dtype and device of the projection it mixes into.")


def attn_stream_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    stream: str | None = None,
    source_projection: torch.Tensor | None = None,
    stream_weights: torch.Tensor | tuple[float, float] | None = None,
) -> torch.Tensor:
    """The reference twin: mix explicitly, repeat kv heads, softmax in fp32; all-masked rows give zeros."""
    check_attention_inputs(q, k, v, attention_mask, stream, source_projection, stream_weights)
    if stream is not None:
        if isinstance(stream_weights, torch.Tensor):
            w = stream_weights.to(q.dtype)[:, None, :, None, None]  # [2, 1, heads, 1, 1]
            w_own, w_src = w[0], w[1]
        else:
            w_own, w_src = stream_weights
        mixed = {"queries": q, "keys": k, "values": v}[stream] * w_own + source_projection * w_src
        q, k, v = (mixed if stream == name else x for name, x in (("queries", q), ("keys", k), ("values", v)))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    t_q, t_k = q.shape[2], k.shape[2]
    keep = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    keep = keep[None, None] if attention_mask is None else keep & attention_mask
    scores = scores.masked_fill(~keep, -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: softmax of -inf is nan -> 0
    return torch.matmul(probs.to(v.dtype), v).transpose(1, 2)


__all__ = ["STREAM_CODES", "attn_stream_attention_reference", "check_attention_inputs"]
