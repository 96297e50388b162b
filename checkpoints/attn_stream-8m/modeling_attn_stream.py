"""AttnStream: a Llama-style causal LM with residual attention streams (Burns, Fukai & Earls, 2412.15113).

Every attention head of layer l mixes the raw projection of the same head of a source layer into its
own, before attention:  x'_l = w_own * x_l + w_src * x_src,  where x is the value (or key, or query)
projection after its linear layer and before RoPE, x_src is layer l-1's raw projection ("previous", the
paper; not cumulative) or layer 0's ("first", ResFormer), and layer 0 is left unchanged. Because the mix
happens before the attention function, every attention implementation (eager, sdpa, flash, our Triton
kernel) runs unchanged, and the KV cache stores the mixed keys and values. A decoding step recomputes
the source projection for its new tokens in the layer below, so streams need no extra cache.

Everything except the mix is Llama's: the building blocks are imported from transformers' Llama, so
`attention_stream="none"` is exactly `LlamaForCausalLM`.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_attn_stream import AttnStreamConfig
from .compat import CACHE_NAME, legacy_cache_name, resolve_cache, with_cache
from .input_checks import check_labels, check_model_inputs
from .remote_code import SavesRemoteCode

logger = logging.get_logger(__name__)


class AttnStreamAttention(nn.Module):
    """Grouped-query attention whose q, k or v projection is mixed with a source layer's, head by head."""

    def __init__(self, config: AttnStreamConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True

        self.q_proj = nn.Linear(
            config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias
        )
        self.k_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.v_proj = nn.Linear(
            config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias
        )

        # Which projection this layer streams ("values", "keys", "queries") or None; layer 0 only emits.
        self.stream = None if config.attention_stream == "none" else config.attention_stream
        self.mixes_stream = self.stream is not None and layer_idx > 0
        if self.mixes_stream and config.stream_weighting == "learned":
            # Row 0: weight of the layer's own projection, row 1: weight of the source's, one per head.
            self.stream_weights = nn.Parameter(torch.empty(2, config.stream_heads))
        else:
            self.stream_weights = None
        self.fixed_stream_weights = config.initial_stream_weights()

    def mix_stream(self, own: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """w_own * own + w_src * source for tensors laid out [batch, seq, heads, head_dim]."""
        if source.shape != own.shape:
            raise ValueError(
                f"Layer {self.layer_idx}: stream source of shape {tuple(source.shape)} does not match the "
                f"{self.stream} projection of shape {tuple(own.shape)}."
            )
        if self.stream_weights is None:
            w_own, w_src = self.fixed_stream_weights
            return own + source if (w_own, w_src) == (1.0, 1.0) else w_own * own + w_src * source
        w = self.stream_weights.to(own.dtype)[:, None, :, None]  # [2, 1, heads, 1] broadcasts over batch/dim
        return w[0] * own + w[1] * source

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        source_projection: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        projections = {
            "queries": self.q_proj(hidden_states).view(hidden_shape),
            "keys": self.k_proj(hidden_states).view(hidden_shape),
            "values": self.v_proj(hidden_states).view(hidden_shape),
        }
        raw = projections[self.stream] if self.stream is not None else None
        if self.mixes_stream:
            if source_projection is None:
                raise ValueError(f"Layer {self.layer_idx} streams {self.stream} but received no source projection.")
            projections[self.stream] = self.mix_stream(raw, source_projection)
            # The parts of the mix travel as keywords too: an attention function may use them (amformers_triton
            # mixes values inside its tile loads) or ignore them, as every transformers function does.
            weights = self.stream_weights if self.stream_weights is not None else self.fixed_stream_weights
            kwargs = {
                **kwargs,
                "stream": self.stream,
                "own_projection": raw.transpose(1, 2),
                "source_projection": source_projection.transpose(1, 2),
                "stream_weights": weights,
            }

        query_states = projections["queries"].transpose(1, 2)
        key_states = projections["keys"].transpose(1, 2)
        value_states = projections["values"].transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, attn_weights, raw


class AttnStreamDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: AttnStreamConfig, layer_idx: int):
        super().__init__()
        self.self_attn = AttnStreamAttention(config=config, layer_idx=layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        source_projection: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new hidden states and this layer's raw streamed projection (None without a stream).

        `source_projection` comes positionally, like `hidden_states`: reentrant gradient checkpointing only carries
        gradients through positional tensors.
        """
        residual = hidden_states
        hidden_states, _, raw = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            source_projection=source_projection,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, raw


class AttnStreamPreTrainedModel(SavesRemoteCode, PreTrainedModel):
    config: AttnStreamConfig
    config_class = AttnStreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["AttnStreamDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": AttnStreamDecoderLayer, "attentions": AttnStreamAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AttnStreamAttention) and module.stream_weights is not None:
            w_own, w_src = self.config.initial_stream_weights()
            init.constant_(module.stream_weights[0], w_own)
            init.constant_(module.stream_weights[1], w_src)

    def remote_code_classes(self) -> dict[str, type]:
        return {"AutoModel": AttnStreamModel, "AutoModelForCausalLM": AttnStreamForCausalLM}


class AttnStreamModel(AttnStreamPreTrainedModel):
    def __init__(self, config: AttnStreamConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [AttnStreamDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @legacy_cache_name
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        r"""
        cache (`Cache`, *optional*): the key/value cache to continue from, updated in place (`past_key_values`
            before transformers 5.24; both names are accepted).
        """
        check_model_inputs(self.config, input_ids, inputs_embeds, attention_mask)
        cache = resolve_cache(cache, past_key_values)
        if self.gradient_checkpointing and self.training and (use_cache or cache is not None):
            use_cache, cache = False, None  # recomputed layers would write their keys and values twice
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            if isinstance(past_seen_tokens, int):
                self._warn_past_max_positions(past_seen_tokens + inputs_embeds.shape[1])
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # The cache is passed by position: its keyword is `cache` from transformers 5.24, `past_key_values` before.
        causal_mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids=position_ids)
        stream = None  # raw projection of the source layer for the next layer's mix
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, raw = decoder_layer(
                hidden_states,
                stream,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
            if self.config.stream_source == "previous" or stream is None:
                stream = raw

        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **with_cache(cache))

    def _warn_past_max_positions(self, length: int) -> None:
        if length > self.config.max_position_embeddings and not torch.compiler.is_compiling():
            logger.warning_once(
                f"Sequence length {length} exceeds `max_position_embeddings` ({self.config.max_position_embeddings}): "
                "rotary positions past it were never trained, so outputs may degrade."
            )


class AttnStreamForCausalLM(AttnStreamPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: AttnStreamConfig):
        super().__init__(config)
        self.model = AttnStreamModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @legacy_cache_name
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        cache (`Cache`, *optional*): the key/value cache to continue from, updated in place (`past_key_values`
            before transformers 5.24; both names are accepted).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the next-token loss; the shift happens inside. Positions set to -100 are ignored.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0): compute logits only for the last N positions
            (0 keeps all), or for the given indices.
        """
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            check_labels(labels, input_ids, inputs_embeds)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **with_cache(getattr(outputs, CACHE_NAME)),
        )


__all__ = ["AttnStreamForCausalLM", "AttnStreamModel", "AttnStreamPreTrainedModel"]
