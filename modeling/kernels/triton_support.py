"""Whether Triton kernels can run here, decided in one place with one error and one remedy.

Every way of asking for a Triton kernel (a model's attn_implementation="amformers_triton", `palimpsa_attention(...,
impl="triton")`, a direct call of a Triton wrapper) goes through `load_triton_kernel` or `require_triton_device`,
so a CPU or Triton-less machine always gets the same refusal naming the PyTorch paths that work there.
"""

import os
from collections.abc import Callable

import torch

# The attn_implementation name of our Triton kernels, for both families.
TRITON_ATTN_IMPLEMENTATION = "amformers_triton"

# The PyTorch paths that run everywhere, named in every refusal: one remedy per way of asking for Triton.
PYTORCH_ALTERNATIVES = (
    "the PyTorch path instead: attn_implementation='sdpa' (or 'eager') for AttnStream, 'eager' (or "
    "'palimpsa_chunk') for Palimpsa, impl='chunk' when calling palimpsa_attention directly"
)


def load_triton_kernel(import_kernel: Callable[[], tuple[bool, Callable]], device: torch.device, what: str):
    """The Triton kernel `import_kernel()` imports, if it can run on `device`; else the one RuntimeError that says
    why and names the PyTorch paths. `import_kernel` returns (INTERPRETED of the kernel module, the kernel) and
    imports it with a relative `from .module import ...`, so remote-code checkpoints carry the kernel module.
    `what` names the request in the message, e.g. 'impl="triton"'.
    """
    try:
        interpreted, kernel = import_kernel()
    except ImportError as error:
        raise RuntimeError(
            f"{what} needs Triton, which is not installed ({error}). Install it on a CUDA machine with "
            f"`pip install 'amformers[kernels]'`, or use {PYTORCH_ALTERNATIVES}."
        ) from error
    require_triton_device(device, interpreted, what)
    return kernel


def require_triton_device(device: torch.device, interpreted: bool, what: str) -> None:
    """Return if Triton kernels built with `interpreted` (Triton's interpreter) can run on `device`, else raise."""
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return
    hint = ""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        hint = (
            " TRITON_INTERPRET=1 is set, but only after the kernels were compiled for a GPU; set it before the first "
            "import of triton-using code (e.g. in a fresh process)."
        )
    raise RuntimeError(
        f"{what} runs Triton kernels, which need a CUDA GPU; these tensors are on {device}. Use "
        f"{PYTORCH_ALTERNATIVES} (for testing on CPU only: TRITON_INTERPRET=1 runs the kernels in Triton's "
        f"interpreter).{hint}"
    )


__all__ = ["PYTORCH_ALTERNATIVES", "TRITON_ATTN_IMPLEMENTATION", "load_triton_kernel", "require_triton_device"]
