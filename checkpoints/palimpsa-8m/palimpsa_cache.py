"""Palimpsa's recurrent cache: transformers' linear-attention cache layers, how a layer reads and writes them.

Per layer the cache holds the conv window of the stacked q, k, v inputs ([B, C, conv_size - 1]) and the memory
(mu, I) stacked as [B, 2, H, V, K] float32, so its size does not depend on the context length. Any transformers
`Cache` of linear-attention layers works (`DynamicCache(config=model.config)`, built from `config.layer_types`, and
from transformers 5.24 the caches `generate` builds); `PalimpsaCache` adds the token count 5.23's `generate` asks for.
"""

import torch
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin, LinearAttentionLayer

from .configuration_palimpsa import PalimpsaConfig
from .compat import GENERATE_SUPPORTS_RECURRENT_CACHES


def read_cache(cache: Cache | None, layer_idx: int) -> tuple[torch.Tensor | None, tuple | None]:
    """The layer's conv window [B, C, conv_size - 1] and memory (mu, I) from `cache`, or (None, None) at the start.

    Read before anything is written: the cache updates its tensors in place.
    """
    if cache is None or not cache.has_previous_state(layer_idx):
        return None, None
    state = cache.get_recurrent_state(layer_idx)  # mu and I stacked: [B, 2, H, V, K]
    return cache.get_conv_state(layer_idx), (tuple(state.unbind(1)) if state is not None else None)


def write_cache(cache: Cache | None, layer_idx: int, conv_inputs: torch.Tensor, width: int, state) -> None:
    """Hand the layer's new conv inputs [B, T, C] (the cache keeps the last `width`) and memory (mu, I) to `cache`."""
    if cache is not None:
        cache.update_conv_state(conv_inputs.transpose(1, 2), layer_idx, conv_kernel_size=width)
        cache.update_recurrent_state(torch.stack(state, dim=1), layer_idx)


class PalimpsaCache(Cache):
    """transformers' recurrent cache (one `LinearAttentionLayer` per layer, as `DynamicCache(config=...)` builds
    from `config.layer_types`) plus a count of the tokens it has seen.

    Per layer it holds the conv window of the stacked q, k, v inputs and the memory (mu, I) stacked as
    [B, 2, H, V, K] float32; its size does not depend on the context length. transformers 5.23's `generate`
    asks the cache for its length, which its linear-attention layers cannot tell (they count tokens from 5.25
    on), hence the counter. `PalimpsaModel.forward` builds one when `use_cache` is set and no cache is given.
    """

    def __init__(self, config: PalimpsaConfig | None = None, num_layers: int | None = None):
        num_layers = config.num_hidden_layers if num_layers is None else num_layers
        super().__init__(layers=[LinearAttentionLayer() for _ in range(num_layers)])
        self.tokens_seen = 0

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, state_idx: int = 0, **kwargs):
        if layer_idx == 0 and state_idx == 0:
            self.tokens_seen += conv_states.shape[-1]
        return super().update_conv_state(conv_states, layer_idx, state_idx, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.tokens_seen

    @property
    def is_croppable(self) -> bool:
        return False  # rolling the memory back would need every intermediate state, which the layers do not keep

    @property
    def is_compileable(self) -> bool:
        # transformers 5.23's generate would turn the padding mask into a 4-D attention mask for a compileable cache.
        return GENERATE_SUPPORTS_RECURRENT_CACHES and all(layer.is_compileable for layer in self.layers)

    def reset(self):
        super().reset()
        self.tokens_seen = 0

    def nbytes(self) -> int:
        """Bytes held by the cache (conv windows and memories)."""
        tensors = [
            x
            for layer in self.layers
            for states in (layer.conv_states, layer.recurrent_states)
            for x in states.values()
            if x is not None
        ]
        return sum(x.numel() * x.element_size() for x in tensors)


def check_cache(cache, num_layers: int) -> None:
    """A Palimpsa model keeps a recurrent state: the cache must hold a linear-attention layer per model layer."""
    if cache is None:
        return
    layers = getattr(cache, "layers", None)
    if (
        not isinstance(cache, Cache)
        or layers is None
        or len(layers) < num_layers
        or not all(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in layers[:num_layers])
    ):
        raise TypeError(
            "Palimpsa keeps a recurrent state: its cache must be a PalimpsaCache, or a transformers Cache of "
            f"linear-attention layers such as `DynamicCache(config=model.config)`; got {type(cache).__name__}"
            + (f" with layers {[type(layer).__name__ for layer in layers]}." if layers is not None else ".")
        )


__all__ = ["PalimpsaCache", "check_cache", "read_cache", "write_cache"]
