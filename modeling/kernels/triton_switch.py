"""The "amformers_triton" attention implementation: our Triton kernels behind transformers' switch.

`import amformers` calls `register_triton_attention()`, after which users pick the kernels the transformers way:
`from_pretrained(..., attn_implementation="amformers_triton")` or `model.set_attn_implementation("amformers_triton")`.
AttnStream's attention layer hands `amformers_triton_attention` what it hands every attention function: the
mixed q, k, v, plus the parts of the stream mix as keywords (`stream`, `own_projection`, `source_projection`,
`stream_weights`), which this function uses for a values stream without cached keys (the kernel mixes inside its
tile loads) and which transformers' own functions ignore. Palimpsa maps the same name to the Triton path of its
memory op (`modeling_palimpsa.MEMORY_OPS`). The default on CPU stays the PyTorch path of each family.

Triton is never a hard import: the kernel modules are imported when a kernel is called, through
`triton_support.load_triton_kernel`, the one place that refuses clearly (never falls back) when Triton cannot
run, with the remedy for each family. "Can run" means: the tensors are on a CUDA device, or they are on the CPU
and the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 set before the kernel module was first
imported; tests only, fp32, slow).
"""

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

from .triton_support import TRITON_ATTN_IMPLEMENTATION, load_triton_kernel


def _triton_kernel():
    """Imported only when a kernel runs: the package works without Triton."""
    from .attn_stream_triton import INTERPRETED, attn_stream_flash_attention

    return INTERPRETED, attn_stream_flash_attention


def amformers_triton_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    stream: str | None = None,
    own_projection: torch.Tensor | None = None,
    source_projection: torch.Tensor | None = None,
    stream_weights: torch.Tensor | tuple[float, float] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: q [B, Hq, T, D], k/v [B, Hkv, S, D] -> ([B, T, Hq, D], None).

    q, k, v arrive mixed, as for any attention function. When the caller also passes the parts of a values mix
    (`stream="values"`, `own_projection` = the unmixed values and `source_projection`, both [B, Hkv, T, D], and
    `stream_weights`, a [2, Hkv] tensor or a fixed (w_own, w_src) pair) and no cached keys precede them (S == T),
    the kernel reads the parts and mixes in its tile loads instead of reading `value`. Key and query streams are
    mixed before RoPE, so their parts are not usable here: the mixed tensors are used.
    """
    kernel = load_triton_kernel(_triton_kernel, query.device, f"attn_implementation={TRITON_ATTN_IMPLEMENTATION!r}")
    if dropout:
        raise ValueError(
            f"{TRITON_ATTN_IMPLEMENTATION!r} has no attention dropout (got p={dropout}); set attention_dropout=0 "
            "or use attn_implementation='sdpa'."
        )
    for unsupported in ("softcap", "sliding_window", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(
                f"{TRITON_ATTN_IMPLEMENTATION!r} does not support `{unsupported}`; use attn_implementation='eager'."
            )
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    mix = {}
    if stream == "values" and own_projection is not None and own_projection.shape == value.shape:
        value = own_projection
        mix = {"stream": stream, "source_projection": source_projection, "stream_weights": stream_weights}
    output = kernel(query, key, value, attention_mask, scale=scaling, causal=bool(is_causal), **mix)
    return output, None


def register_triton_attention() -> None:
    """Make "amformers_triton" a valid attn_implementation (attention and mask registries; idempotent)."""
    AttentionInterface.register(TRITON_ATTN_IMPLEMENTATION, amformers_triton_attention)
    # The kernel takes sdpa's boolean mask (None when plain causal), so create_causal_mask must build one.
    AttentionMaskInterface.register(TRITON_ATTN_IMPLEMENTATION, sdpa_mask)


__all__ = [
    "TRITON_ATTN_IMPLEMENTATION",
    "amformers_triton_attention",
    "register_triton_attention",
]
