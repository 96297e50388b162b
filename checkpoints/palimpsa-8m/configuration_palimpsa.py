"""Configuration of Palimpsa, the metaplastic linear-attention LM (Bonnet et al., arXiv 2602.09075).

Each layer's memory is a mean mu and a precision I per (value, key) entry; tokens with a large importance
beta make their entries stiff, the prior pulls I back as the memory forgets. Three layer families share
this config: the official Palimpsa layer (`mixer="palimpsa"`, gates of the official code or, with
`gates="paper"`, of the ICLR paper), and Meta-Mamba2 (`mixer="mamba2"`), the Mamba2 block with the same
precision state, into which `amformers.convert.mamba2_to_palimpsa` loads Mamba2 checkpoints.
`metaplastic=False` keeps I at the prior ("NotPalimpsa"; plain Mamba2 for the mamba2 mixer).
"""

import math

from huggingface_hub.dataclasses import strict
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig

MIXERS = ("palimpsa", "mamba2")
GATES = ("official", "paper")


@strict
class PalimpsaConfig(PreTrainedConfig):
    r"""
    Args:
        vocab_size (`int`, defaults to 8192): number of token ids.
        hidden_size (`int`, defaults to 256): width of the residual stream.
        num_hidden_layers (`int`, defaults to 8): number of blocks.
        num_heads (`int`, defaults to 4): memory heads per layer.
        head_dim (`int`, defaults to 32): key dimension K per head (for `mixer="mamba2"`, the SSM state size).
        expand_v (`float`, defaults to 2.0): value dimension per head V = expand_v * head_dim (must be whole).
            The paper halves K relative to V, because the state holds both mu and I.
        conv_size (`int`, defaults to 4): width of the short causal convolutions.
        intermediate_size (`int`, defaults to 688): width of the SwiGLU MLP after each mixer; 0 = no MLP
            (Mamba2 blocks have none).
        metaplastic (`bool`, defaults to `True`): False keeps the precision at the prior (I == Ip), which runs
            the cheaper gated-linear-attention path ("NotPalimpsa", or plain Mamba2).
        mixer (`str`, defaults to `"palimpsa"`): `"palimpsa"` (short convs + SiLU, L2-normalised q/k, gated
            RMSNorm, output projection) or `"mamba2"` (the Mamba2 block made metaplastic: q = C, k = B, v = dt x).
        gates (`str`, defaults to `"official"`): for the palimpsa mixer, `"official"` (the official code:
            alpha = exp(-dt A), per-head input gate, low-rank beta capped by softplus) or `"paper"` (the ICLR
            paper: alpha = 1 - gamma / N with a learned window N per head, beta = gamma * sigmoid(.), v * beta).
        beta_rank (`int`, *optional*): width of the low-rank beta projection; defaults to hidden_size // 16.
        prior_precision (`float`, defaults to 1.0): the frozen prior precision Ip.
        window_init (`float`, defaults to 16.0): `gates="paper"`: N_init, the window N starts in
            [N_init / 4, 4 N_init].
        n_groups (`int`, defaults to 1): `mixer="mamba2"`: number of B/C groups shared by the heads.
        conv_bias (`bool`, defaults to `False`): bias in the short convolutions.
        use_bias (`bool`, defaults to `False`): `mixer="mamba2"`: bias in the input/output projections.
        time_step_min, time_step_max, time_step_floor (`float`): dt initialisation range (log-uniform).
        time_step_limit (`list[float]`, defaults to `(0.0, inf)`): `mixer="mamba2"`: clamp of dt.
        residual_in_fp32 (`bool`, defaults to `False`): keep the residual stream in float32 (as Mamba2).
        hidden_act (`str`, defaults to `"silu"`): activation of the MLP gate (any name of transformers' `ACT2FN`;
            "silu" makes the MLP SwiGLU). The mixers' own SiLUs (after the convolutions, in the gated norm) are
            part of the architecture and do not follow it.
        initializer_range (`float`, defaults to 0.02): std of the normal weight initialisation.
        rms_norm_eps (`float`, defaults to 1e-6): epsilon of every RMSNorm.
        use_cache (`bool`, defaults to `True`): return the recurrent cache from `forward`.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): special token ids.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding and the LM head.
    """

    model_type = "palimpsa"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 8
    num_heads: int = 4
    head_dim: int = 32
    expand_v: int | float = 2.0
    conv_size: int = 4
    intermediate_size: int = 688
    metaplastic: bool = True
    mixer: str = "palimpsa"
    gates: str = "official"
    beta_rank: int | None = None
    prior_precision: int | float = 1.0
    window_init: int | float = 16.0
    n_groups: int = 1
    conv_bias: bool = False
    use_bias: bool = False
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: list[float] | tuple[float, ...] = (0.0, float("inf"))
    residual_in_fp32: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        if self.beta_rank is None:
            self.beta_rank = max(1, self.hidden_size // 16)
        self.time_step_limit = tuple(self.time_step_limit)
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Called by `@strict` validation: every field combination the model cannot build is refused here."""
        if self.mixer not in MIXERS:
            raise ValueError(f"`mixer` must be one of {MIXERS}, got {self.mixer!r}.")
        if self.gates not in GATES:
            raise ValueError(f"`gates` must be one of {GATES}, got {self.gates!r}.")
        if self.mixer == "mamba2" and self.gates != "official":
            raise ValueError(
                "`gates='paper'` is a parameterisation of the palimpsa mixer; the mamba2 mixer has its own."
            )
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "conv_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must be a name in transformers' ACT2FN, got {self.hidden_act!r}.")
        if self.intermediate_size < 0:
            raise ValueError(f"`intermediate_size` must be >= 0 (0 = no MLP), got {self.intermediate_size}.")
        value_dim = self.expand_v * self.head_dim
        if value_dim <= 0 or not math.isclose(value_dim, round(value_dim)):
            raise ValueError(
                f"`expand_v * head_dim` must be a positive whole number, got {self.expand_v} * {self.head_dim}."
            )
        if self.beta_rank <= 0:
            raise ValueError(f"`beta_rank` must be positive, got {self.beta_rank}.")
        if not self.prior_precision > 0:
            raise ValueError(f"`prior_precision` must be > 0, got {self.prior_precision}.")
        if self.gates == "paper" and not self.window_init > 4:
            raise ValueError(
                f"`window_init` must exceed 4 so that alpha = 1 - gamma / N stays > 0, got {self.window_init}."
            )
        if self.mixer == "mamba2" and (self.n_groups <= 0 or self.num_heads % self.n_groups != 0):
            raise ValueError(f"`num_heads` ({self.num_heads}) must be a multiple of `n_groups` ({self.n_groups}).")
        if not 0 < self.time_step_min <= self.time_step_max:
            raise ValueError("Need 0 < `time_step_min` <= `time_step_max`.")
        if len(self.time_step_limit) != 2 or self.time_step_limit[0] > self.time_step_limit[1]:
            raise ValueError(f"`time_step_limit` must be (low, high), got {self.time_step_limit}.")

    @property
    def layer_types(self) -> list[str]:
        """Every layer keeps a recurrent state: `DynamicCache(config=...)` builds linear-attention cache layers."""
        return ["linear_attention"] * self.num_hidden_layers

    @property
    def value_dim(self) -> int:
        """V, the value dimension of one head."""
        return round(self.expand_v * self.head_dim)


__all__ = ["PalimpsaConfig"]
