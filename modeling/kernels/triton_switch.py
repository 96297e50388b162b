"""The "amformers_triton" attention implementation: our Triton kernels behind transformers' switch.

`import amformers` calls `register_triton_attention()`, after which users pick the kernels the transformers way:
`from_pretrained(..., attn_implementation="amformers_triton")` or `model.set_attn_implementation("amformers_triton")`.
AttnStream dispatches its attention to `amformers_triton_attention` (the flash-attention kernel, with the stream mix
fused into its loads when the model hands over the unmixed projection); Palimpsa maps the same name to
`impl="triton"` of its scan. "eager" and "sdpa" keep the PyTorch paths, and the default on CPU stays the PyTorch path.

Triton is never a hard import: this module only imports it when a kernel is called, and then refuses clearly
(naming "sdpa"/"eager" as the alternatives) rather than falling back when Triton cannot run here. "Can run" means:
the tensors are on a CUDA device, or they are on the CPU and the kernels were built by Triton's interpreter
(TRITON_INTERPRET=1 set before the kernel module was first imported; tests only, fp32, slow).
"""

import importlib
import os

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask

TRITON_ATTN_IMPLEMENTATION = "amformers_triton"
PYTORCH_ALTERNATIVES = "attn_implementation='sdpa' (the fast PyTorch path) or 'eager'"


def load_triton_kernels(module_name: str, device: torch.device, what: str):
    """Import `amformers.modeling.kernels.<module_name>` if its Triton kernels can run on `device`, else raise.

    `what` names the caller in the error message, e.g. "attn_implementation='amformers_triton'".
    """
    try:
        kernels = importlib.import_module(f"{__package__}.{module_name}")
    except ImportError as error:
        raise RuntimeError(
            f"{what} needs Triton, which is not installed ({error}). Install it on a CUDA machine with "
            f"`pip install 'amformers[kernels]'`, or use {PYTORCH_ALTERNATIVES}."
        ) from error
    device = torch.device(device)
    if device.type == "cuda":
        return kernels
    if device.type == "cpu" and kernels.INTERPRETED:
        return kernels
    hint = ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        hint = (
            " TRITON_INTERPRET=1 is set, but only after the kernels were compiled for a GPU; set it before the first "
            "import of triton-using code (e.g. in a fresh process)."
        )
    raise RuntimeError(
        f"{what} runs Triton kernels, which need a CUDA GPU; these tensors are on {device}. Use "
        f"{PYTORCH_ALTERNATIVES} instead (for testing on CPU only: TRITON_INTERPRET=1 runs the kernels in Triton's "
        f"interpreter).{hint}"
    )


def amformers_triton_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    stream_mix: tuple | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: q [B, Hq, T, D], k/v [B, Hkv, S, D] -> ([B, T, Hq, D], None).

    `stream_mix=(stream, source, weights)` (from AttnStream, without a cache) asks the kernel to use
    `w_own * x + w_src * source` for x = the `stream` ("queries"/"keys"/"values") argument, mixing inside its loads;
    `weights` is a [2, heads] tensor or a fixed (w_own, w_src) pair.
    """
    kernels = load_triton_kernels(
        "attn_stream_triton", query.device, f"attn_implementation={TRITON_ATTN_IMPLEMENTATION!r}"
    )
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
    stream, source, weights = stream_mix if stream_mix is not None else (None, None, None)
    output = kernels.attn_stream_flash_attention(
        query,
        key,
        value,
        attention_mask,
        scale=scaling,
        causal=bool(is_causal),
        stream=stream,
        stream_source=source,
        stream_weights=weights,
    )
    return output, None


# Read by AttnStreamAttention: a function with this flag mixes the stream itself, given the unmixed projection.
amformers_triton_attention.fuses_stream_mix = True


def register_triton_attention() -> None:
    """Make "amformers_triton" a valid attn_implementation (attention and mask registries; idempotent)."""
    AttentionInterface.register(TRITON_ATTN_IMPLEMENTATION, amformers_triton_attention)
    # The kernel takes sdpa's boolean mask (None when plain causal), so create_causal_mask must build one.
    AttentionMaskInterface.register(TRITON_ATTN_IMPLEMENTATION, sdpa_mask)


__all__ = [
    "PYTORCH_ALTERNATIVES",
    "TRITON_ATTN_IMPLEMENTATION",
    "amformers_triton_attention",
    "load_triton_kernels",
    "register_triton_attention",
]
