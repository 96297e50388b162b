"""Configuration of AttnStream, a Llama-style transformer with residual attention streams.

Burns, Fukai & Earls (arXiv 2412.15113): head h of layer l adds the *raw* value (or key, or query)
projection of head h of layer l-1 to its own, before attention. ResFormer (Zhou et al., arXiv
2410.17897) is the `stream_source="first"` variant: every later layer mixes in layer 0's projection.
With `attention_stream="none"` the model is exactly Llama.
"""

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

ATTENTION_STREAMS = ("values", "keys", "queries", "none")
STREAM_SOURCES = ("previous", "first")
STREAM_WEIGHTINGS = ("fixed", "learned")
STREAM_INITS = ("fixed", "identity")

# (weight of the layer's own projection, weight of the source projection) for each stream source.
FIXED_STREAM_WEIGHTS = {"previous": (1.0, 1.0), "first": (0.5, 0.5)}


@strict
class AttnStreamConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size (`int`, defaults to 8192): number of token ids.
        hidden_size (`int`, defaults to 256): width of the residual stream.
        intermediate_size (`int`, defaults to 688): width of the SwiGLU MLP.
        num_hidden_layers (`int`, defaults to 8): number of decoder layers.
        num_attention_heads (`int`, defaults to 16): query heads per layer.
        num_key_value_heads (`int`, *optional*): key/value heads (grouped-query attention); defaults to
            `num_attention_heads`.
        head_dim (`int`, *optional*): width of one head; defaults to `hidden_size // num_attention_heads`.
        hidden_act (`str`, defaults to `"silu"`): activation of the MLP gate.
        max_position_embeddings (`int`, defaults to 2048): longest sequence the RoPE tables are sized for.
        initializer_range (`float`, defaults to 0.02): std of the normal weight initialisation.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of the RMSNorm layers.
        use_cache (`bool`, defaults to `True`): return a KV cache from `forward`.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding and the LM head.
        rope_parameters (`dict`, *optional*): RoPE settings as in `LlamaConfig` (`rope_theta`, `rope_type`, ...).
        attention_bias (`bool`, defaults to `False`): bias in the q/k/v/o projections.
        attention_dropout (`float`, defaults to 0.0): dropout on the attention probabilities.
        mlp_bias (`bool`, defaults to `False`): bias in the MLP projections.
        attention_stream (`str`, defaults to `"values"`): which projection flows to the next layer's same
            head: `"values"`, `"keys"`, `"queries"`, or `"none"` (plain Llama).
        stream_source (`str`, defaults to `"previous"`): `"previous"` (the paper: layer l mixes in the raw
            projection of layer l-1; not cumulative) or `"first"` (ResFormer: layer l mixes in layer 0's).
            Layer 0 is never changed.
        stream_weighting (`str`, defaults to `"fixed"`): `"fixed"` mixes `w_own * own + w_src * source` with
            (1, 1) for `"previous"` and (0.5, 0.5) for `"first"`; `"learned"` gives every layer after the
            first one trainable (w_own, w_src) pair per head (the `stream_weights` parameter of its attention).
            Configs saved before the rename spell this field `stream_weights`; they load unchanged.
        stream_init (`str`, defaults to `"fixed"`): initial value of learned weights: `"fixed"` (the fixed
            weights above) or `"identity"` ((1, 0): the model starts as the stream-free model, which is how
            streams are retrofitted into a trained Llama checkpoint).
    """

    model_type = "attn_stream"
    # The field was `stream_weights` until the name was left to the learned tensor; old configs still load.
    attribute_map = {"stream_weights": "stream_weighting"}
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 8
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    attention_stream: str = "values"
    stream_source: str = "previous"
    stream_weighting: str = "fixed"
    stream_init: str = "fixed"

    def __post_init__(self, **kwargs):
        if self.num_attention_heads <= 0 or self.hidden_size <= 0:
            raise ValueError("`hidden_size` and `num_attention_heads` must be positive.")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ValueError(
                    f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                    f"({self.num_attention_heads}), or set `head_dim` explicitly."
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by `@strict` validation: every field combination the model cannot build is refused here."""
        for name, allowed in (
            ("attention_stream", ATTENTION_STREAMS),
            ("stream_source", STREAM_SOURCES),
            ("stream_weighting", STREAM_WEIGHTINGS),
            ("stream_init", STREAM_INITS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
        if self.stream_init == "identity" and self.stream_weighting != "learned":
            raise ValueError(
                "`stream_init='identity'` only makes sense with `stream_weighting='learned'` "
                "(fixed weights cannot start at (1, 0))."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                f"`num_key_value_heads` ({self.num_key_value_heads})."
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"`head_dim` ({self.head_dim}) must be even for rotary embeddings.")
        for name in ("vocab_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")

    @property
    def stream_heads(self) -> int:
        """Number of heads whose projection is streamed (query heads, or key/value heads)."""
        return self.num_attention_heads if self.attention_stream == "queries" else self.num_key_value_heads

    def initial_stream_weights(self) -> tuple[float, float]:
        """(w_own, w_src) the mix starts from (and keeps, when the weights are fixed)."""
        if self.stream_weighting == "learned" and self.stream_init == "identity":
            return (1.0, 0.0)
        return FIXED_STREAM_WEIGHTS[self.stream_source]


__all__ = ["AttnStreamConfig"]
