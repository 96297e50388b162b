"""Palimpsa: a causal LM whose layers are metaplastic linear attention (Bonnet et al., arXiv 2602.09075).

Each head keeps a memory mu and a precision I of shape [V, K]. Writing a token adds v k^T to the
precision-weighted memory and beta k^2 to the precision, forgetting pulls both back towards the prior, and
the read-out is mu q (see `kernels/palimpsa.py` for the exact recurrence). Entries that received important
tokens become stiff, so new tokens overwrite what mattered less: the memory is a palimpsest.

Layers:
* `PalimpsaMixer`, the official code's current layer: short causal convs + SiLU on q, k, v; L2-normalised
  q, k; Mamba2-style forgetting alpha = exp(-dt A); a per-head input gate on v; a low-rank importance beta
  capped by softplus; a frozen prior; a D skip; a per-head gated RMSNorm and an output projection. With
  `gates="paper"` the forgetting and importance follow the ICLR paper instead (alpha = 1 - gamma / N).
* `MetaMamba2Mixer`, Mamba2's block (q = C, k = B, v = dt x) with the same precision state. With
  `metaplastic=False` it is exactly Mamba2, which is how Mamba2 checkpoints come in (`amformers.convert`).

Blocks are pre-norm, followed by a SwiGLU MLP when `intermediate_size > 0`; embeddings are tied. Generation
keeps a `PalimpsaCache` (per layer the state (mu, I) and the conv windows, plus a token counter), so a
decoding step costs the same whatever the context length. Padded positions (attention_mask == 0) are
made no-ops (no input, no forgetting), so left padding never touches the state.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel, slice_logits_to_keep
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.utils import can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from ..configuration.configuration_palimpsa import PalimpsaConfig
from .compat import CACHE_NAME, GENERATE_SUPPORTS_RECURRENT_CACHES, legacy_cache_name, resolve_cache, with_cache
from .input_checks import check_labels, check_model_inputs
from .kernels.palimpsa import palimpsa_attention, uses_cpu_ops
from .kernels.palimpsa_cpu import causal_conv_cpu
from .kernels.triton_support import TRITON_ATTN_IMPLEMENTATION
from .palimpsa_cache import PalimpsaCache, check_cache, read_cache, write_cache
from .remote_code import SavesRemoteCode

# How `attn_implementation` (config, `from_pretrained(..., attn_implementation=...)` or `set_attn_implementation`)
# picks the path of the memory op, decided here only. "eager", the default: the fastest path that runs here (see
# `palimpsa_attention(impl="auto")`: on CPU the fused C++ loop when it builds, else the chunked PyTorch scan; the
# one-token recurrence when decoding). The others force one path: the token loop the paper writes (slow; the
# reference every fast path is tested against), the chunked PyTorch scan, the C++ CPU loop, or the Triton kernels.
MEMORY_OPS = {
    "eager": "auto",
    "palimpsa_reference": "reference",
    "palimpsa_chunk": "chunk",
    "palimpsa_cpu": "cpu",
    TRITON_ATTN_IMPLEMENTATION: "triton",
}


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, window: torch.Tensor | None, impl: str
) -> torch.Tensor:
    """SiLU of the depthwise causal convolution of x [B, T, C] (weight [C, conv_size], bias [C] or None),
    continuing from `window` [B, C, conv_size - 1], the previous inputs channels-first (None: zeros, a fresh start).

    Written as a sum of shifted products (conv_size terms): on CPU its backward is faster than Conv1d's. Where the
    memory op's path `impl` runs the C++ CPU ops, the same computation runs there in one fused pass.
    """
    T, width = x.shape[1], weight.shape[1] - 1
    weight = weight.to(x.dtype)
    if window is None:
        window = x.new_zeros(x.shape[0], x.shape[2], width)
    full = torch.cat([window.transpose(1, 2).to(x.dtype), x], dim=1)
    if uses_cpu_ops(impl, x.device):
        return causal_conv_cpu(full, weight, bias)
    out = full[:, :T] * weight[:, 0]
    for i in range(1, width + 1):
        out = out + full[:, i : i + T] * weight[:, i]
    if bias is not None:
        out = out + bias.to(x.dtype)
    return F.silu(out)


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of `group_size` channels, gated by SiLU(gate): before the norm (Mamba2) or after it
    (the official Palimpsa layer, fla's FusedRMSNormGated). The weight broadcasts over the last dimension."""

    def __init__(self, weight_size: int, group_size: int, eps: float, norm_before_gate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(weight_size))
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x, gate = x.float(), F.silu(gate.float())
        if not self.norm_before_gate:
            x = x * gate
        groups = x.view(*x.shape[:-1], -1, self.group_size)
        x = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).view(x.shape)
        if self.norm_before_gate:
            x = x * gate
        return self.weight * x.to(dtype)


def init_time_step_bias(num_heads: int, config: PalimpsaConfig) -> torch.Tensor:
    """dt_bias such that softplus(dt_bias) is log-uniform in [time_step_min, time_step_max] (Mamba2's init)."""
    low, high = math.log(config.time_step_min), math.log(config.time_step_max)
    dt = torch.exp(torch.rand(num_heads) * (high - low) + low).clamp(min=config.time_step_floor)
    return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus


class PalimpsaMixer(nn.Module):
    """The Palimpsa token mixer (official code's current form, or the ICLR paper's gates)."""

    def __init__(self, config: PalimpsaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, K, V, D = config.num_heads, config.head_dim, config.value_dim, config.hidden_size
        self.num_heads, self.head_dim, self.value_dim = H, K, V
        self.q_proj = nn.Linear(D, H * K, bias=False)
        self.k_proj = nn.Linear(D, H * K, bias=False)
        self.v_proj = nn.Linear(D, H * V, bias=False)
        self.q_conv1d = nn.Conv1d(H * K, H * K, config.conv_size, groups=H * K, bias=config.conv_bias)
        self.k_conv1d = nn.Conv1d(H * K, H * K, config.conv_size, groups=H * K, bias=config.conv_bias)
        self.v_conv1d = nn.Conv1d(H * V, H * V, config.conv_size, groups=H * V, bias=config.conv_bias)
        self.paper_gates = config.gates == "paper"
        if self.paper_gates:
            self.gamma_proj = nn.Linear(D, H, bias=False)  # gamma: how much to write and to forget
            self.log_window = nn.Parameter(torch.empty(H))  # N = window_init * exp(log_window)
        else:
            self.dt_proj = nn.Linear(D, H, bias=False)
            self.dt_bias = nn.Parameter(torch.empty(H))
            self.A_log = nn.Parameter(torch.empty(H))
            self.bs_proj = nn.Linear(D, H, bias=False)  # per-head input gate on v
        # Low-rank importance: beta in R^V per head (the paper's gates also use it to scale v).
        self.has_beta = self.paper_gates or config.metaplastic
        if self.has_beta:
            self.b_rank_proj = nn.Linear(D, config.beta_rank, bias=False)
            self.b_proj = nn.Linear(config.beta_rank, H * V, bias=False)
        if config.metaplastic and not self.paper_gates:
            self.b_scale = nn.Parameter(torch.empty(H))  # beta <= softplus(b_scale): bounds the precision growth
        # The prior precision is frozen (as in the official code): a buffer, saved with the weights, set here and
        # again by `init_parameters` (a model built on the meta device gets its value there).
        self.register_buffer("log_prior_precision", torch.full((H,), math.log(config.prior_precision)))
        self.D = nn.Parameter(torch.empty(H))
        self.g_proj = nn.Linear(D, H * V, bias=False)
        self.o_norm = GatedRMSNorm(V, V, config.rms_norm_eps, norm_before_gate=True)
        self.o_proj = nn.Linear(H * V, D, bias=False)
        # Every projection of the layer input, in the order `project_input` returns them.
        gates = ["gamma_proj"] if self.paper_gates else ["dt_proj", "bs_proj"]
        self.input_projections = ["q_proj", "k_proj", "v_proj", "g_proj", *gates]
        self.input_projections += ["b_rank_proj"] if self.has_beta else []

    @torch.no_grad()
    def init_parameters(self):
        """The official initialisation of the layer's own parameters (projections are N(0, 0.02))."""
        config, H = self.config, self.num_heads
        if self.paper_gates:
            init.uniform_(self.log_window, -math.log(4), math.log(4))
        else:
            init.copy_(self.A_log, torch.empty(H).uniform_(0, 16).log())
            init.copy_(self.dt_bias, init_time_step_bias(H, config))
        if self.has_beta:
            bound = config.beta_rank**-0.5
            init.uniform_(self.b_proj.weight, -bound, bound)
        if hasattr(self, "b_scale"):
            init.ones_(self.b_scale)
        init.constant_(self.log_prior_precision, math.log(config.prior_precision))
        init.ones_(self.D)

    def project_input(self, hidden_states) -> dict[str, torch.Tensor]:
        """Each of `input_projections` applied to the layer input, by name. Where all are plain bias-free
        `nn.Linear` layers without hooks, as one matrix product over their stacked weights (one wide product is
        cheaper than several thin ones, forward and backward); otherwise (PEFT adapters, quantised layers, hooks)
        each layer runs itself, so whatever wraps or watches it still sees its call."""
        layers = [getattr(self, name) for name in self.input_projections]
        if all(
            type(x) is nn.Linear and x.bias is None and not (x._forward_hooks or x._forward_pre_hooks) for x in layers
        ):
            fused = F.linear(hidden_states, torch.cat([x.weight for x in layers]))
            outputs = fused.split([x.out_features for x in layers], dim=-1)
        else:
            outputs = [x(hidden_states) for x in layers]
        return dict(zip(self.input_projections, outputs))

    def forward(self, hidden_states, mask=None, cache=None, output_uncertainty=False):
        B, T, _ = hidden_states.shape
        H, K, V = self.num_heads, self.head_dim, self.value_dim
        window, state = read_cache(cache, self.layer_idx)
        projected = self.project_input(hidden_states)
        qkx = torch.cat([projected["q_proj"], projected["k_proj"], projected["v_proj"]], -1)
        if mask is not None:  # padded positions feed zeros to the convolutions, as at a sequence start
            qkx = qkx * mask[..., None]
        # The three depthwise convolutions run as one over the stacked channels (one conv window in the cache).
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        weight = torch.cat([conv.weight[:, 0] for conv in convs])
        bias = torch.cat([conv.bias for conv in convs]) if self.config.conv_bias else None
        impl = MEMORY_OPS[self.config._attn_implementation]
        q, k, x = causal_conv(qkx, weight, bias, window, impl).split([H * K, H * K, H * V], dim=-1)
        q, k = l2_normalize(q.reshape(B, T, H, K)), l2_normalize(k.reshape(B, T, H, K))
        x = x.reshape(B, T, H, V)

        if self.has_beta:
            beta = torch.sigmoid(self.b_proj(projected["b_rank_proj"]).float()).view(B, T, H, V)
        if self.paper_gates:
            gamma = torch.sigmoid(projected["gamma_proj"].float())
            window = self.config.window_init * self.log_window.float().exp()
            log_alpha = torch.log1p(-gamma / window)
            beta = gamma[..., None] * beta
            v = x * beta  # the paper writes beta * v: no input without importance
        else:
            dt = F.softplus(projected["dt_proj"].float() + self.dt_bias.float())
            log_alpha = -dt * self.A_log.float().exp()
            input_gate = torch.sigmoid(projected["bs_proj"].float())[..., None]
            v = x * input_gate
            if self.has_beta:
                beta = beta * F.softplus(self.b_scale.float())[:, None] * input_gate
        beta = beta if self.config.metaplastic else None
        if mask is not None:  # padded positions: nothing written, nothing forgotten
            v, log_alpha = v * mask[..., None, None], log_alpha * mask[..., None]
            beta = beta * mask[..., None, None] if beta is not None else None

        result = palimpsa_attention(
            q,
            k,
            v.to(q.dtype),
            beta,
            log_alpha,
            prior_precision=self.log_prior_precision.float().exp(),
            initial_state=state,
            output_final_state=cache is not None,
            output_uncertainty=output_uncertainty,
            impl=impl,
            validate=False,
            precision_is_prior=not self.config.metaplastic,
        )
        o = result[0]
        write_cache(cache, self.layer_idx, qkx, self.config.conv_size - 1, result[1])
        o = o + self.D.to(o.dtype)[:, None] * x
        o = self.o_norm(o, projected["g_proj"].view(B, T, H, V))
        return self.o_proj(o.reshape(B, T, H * V)), (result[2] if output_uncertainty else None)


class MetaMamba2Mixer(nn.Module):
    """Mamba2's mixer with Palimpsa's precision state: q = C, k = B, v = dt x, beta = dt sigmoid(.) softplus(b_scale).

    Parameter names follow transformers' `Mamba2Mixer`, so its weights load unchanged.
    """

    def __init__(self, config: PalimpsaConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        H, K, V, G = config.num_heads, config.head_dim, config.value_dim, config.n_groups
        # head_dim is K (Mamba2's state size), value_dim is V (Mamba2's head_dim): as in the config and PalimpsaMixer.
        self.num_heads, self.head_dim, self.value_dim, self.n_groups = H, K, V, G
        self.inner_size = H * V
        self.conv_dim = self.inner_size + 2 * G * K
        self.in_proj = nn.Linear(config.hidden_size, self.inner_size + self.conv_dim + H, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, config.conv_size, groups=self.conv_dim, bias=config.conv_bias
        )
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        if config.metaplastic:
            self.b_rank_proj = nn.Linear(config.hidden_size, config.beta_rank, bias=False)
            self.b_proj = nn.Linear(config.beta_rank, self.inner_size, bias=False)
            self.b_scale = nn.Parameter(torch.empty(H))
        self.register_buffer("log_prior_precision", torch.full((H,), math.log(config.prior_precision)))  # frozen
        self.norm = GatedRMSNorm(self.inner_size, self.inner_size // G, config.rms_norm_eps, norm_before_gate=False)
        self.out_proj = nn.Linear(self.inner_size, config.hidden_size, bias=config.use_bias)

    @torch.no_grad()
    def init_parameters(self):
        """Official Meta-Mamba2 initialisation of the layer's own parameters (projections are N(0, 0.02))."""
        config, H = self.config, self.num_heads
        init.copy_(self.A_log, torch.empty(H).uniform_(0, 16).log())
        init.copy_(self.dt_bias, init_time_step_bias(H, config))
        init.ones_(self.D)
        init.constant_(self.log_prior_precision, math.log(config.prior_precision))
        self.init_importance()

    @torch.no_grad()
    def init_importance(self, finetuning: bool = False):
        """The importance pathway (beta). `finetuning` draws b_scale in [0.1, 1], the official choice when a
        pretrained Mamba2 is made metaplastic; from scratch b_scale starts at 1."""
        if not self.config.metaplastic:
            return
        bound = self.config.beta_rank**-0.5
        init.normal_(self.b_rank_proj.weight, std=self.config.initializer_range)
        init.uniform_(self.b_proj.weight, -bound, bound)
        if finetuning:
            init.uniform_(self.b_scale, 0.1, 1.0)
        else:
            init.ones_(self.b_scale)

    def forward(self, hidden_states, mask=None, cache=None, output_uncertainty=False):
        B, T, _ = hidden_states.shape
        H, K, V, G = self.num_heads, self.head_dim, self.value_dim, self.n_groups
        window, state = read_cache(cache, self.layer_idx)
        gate, conv_inputs, dt = self.in_proj(hidden_states).split([self.inner_size, self.conv_dim, H], dim=-1)
        if mask is not None:
            conv_inputs = conv_inputs * mask[..., None]
        bias = self.conv1d.bias if self.config.conv_bias else None
        impl = MEMORY_OPS[self.config._attn_implementation]
        xBC = causal_conv(conv_inputs, self.conv1d.weight[:, 0], bias, window, impl)
        x, Bk, C = xBC.split([self.inner_size, G * K, G * K], dim=-1)
        x = x.view(B, T, H, V)
        q = C.view(B, T, G, K).repeat_interleave(H // G, dim=2)
        k = Bk.view(B, T, G, K).repeat_interleave(H // G, dim=2)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.config.time_step_limit)
        log_alpha = -dt * self.A_log.float().exp()
        # Mamba2 multiplies B by dt; Palimpsa must put dt on v and beta instead, since k also enters as k^2.
        v = x.float() * dt[..., None]
        beta = None
        if self.config.metaplastic:
            importance = torch.sigmoid(self.b_proj(self.b_rank_proj(hidden_states)).float()).view(B, T, H, V)
            beta = dt[..., None] * importance * F.softplus(self.b_scale.float())[:, None]
        if mask is not None:
            v, log_alpha = v * mask[..., None, None], log_alpha * mask[..., None]
            beta = beta * mask[..., None, None] if beta is not None else None

        result = palimpsa_attention(
            q,
            k,
            v.to(q.dtype),
            beta,
            log_alpha,
            prior_precision=self.log_prior_precision.float().exp(),
            scale=1.0,
            initial_state=state,
            output_final_state=cache is not None,
            output_uncertainty=output_uncertainty,
            impl=impl,
            validate=False,
            precision_is_prior=not self.config.metaplastic,
        )
        o = result[0]
        write_cache(cache, self.layer_idx, conv_inputs, self.config.conv_size - 1, result[1])
        o = o.float() + self.D.float()[:, None] * x.float()
        y = self.norm(o.reshape(B, T, self.inner_size).to(hidden_states.dtype), gate)
        return self.out_proj(y.to(hidden_states.dtype)), (result[2] if output_uncertainty else None)


class PalimpsaMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), act = `config.hidden_act` (SwiGLU with the default "silu")."""

    def __init__(self, config: PalimpsaConfig):
        super().__init__()
        self.act_fn = ACT2FN[config.hidden_act]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PalimpsaDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: h + mixer(norm(h)), then h + MLP(norm(h)) when the config has an MLP."""

    def __init__(self, config: PalimpsaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.residual_in_fp32 = config.residual_in_fp32
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        mixer_class = MetaMamba2Mixer if config.mixer == "mamba2" else PalimpsaMixer
        self.mixer = mixer_class(config, layer_idx)
        if config.intermediate_size > 0:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = PalimpsaMLP(config)
        else:
            self.post_attention_layernorm = self.mlp = None

    def forward(self, hidden_states, mask=None, cache=None, output_uncertainty=False, **kwargs):
        residual = hidden_states.float() if self.residual_in_fp32 else hidden_states
        mixed, uncertainty = self.mixer(
            self.input_layernorm(hidden_states), mask=mask, cache=cache, output_uncertainty=output_uncertainty
        )
        hidden_states = residual + mixed
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, uncertainty


@dataclass
class PalimpsaModelOutput(BaseModelOutputWithPast):
    r"""
    uncertainties (`tuple[torch.Tensor]`, *optional*): with `output_uncertainty=True`, one [B, T, H, V] tensor per
        layer: the posterior-variance readout var_t[v] = sum_k q_t[k]^2 / I_t[v, k].
    """

    uncertainties: tuple[torch.Tensor, ...] | None = None


@dataclass
class PalimpsaCausalLMOutput(CausalLMOutputWithPast):
    r"""
    uncertainties (`tuple[torch.Tensor]`, *optional*): per-layer posterior-variance readout (see `PalimpsaModelOutput`).
    """

    uncertainties: tuple[torch.Tensor, ...] | None = None


class PalimpsaPreTrainedModel(SavesRemoteCode, PreTrainedModel):
    config: PalimpsaConfig
    config_class = PalimpsaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PalimpsaDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _is_stateful = True
    # The forward compiles with fullgraph=True on every release; `generate` compiles it with a static recurrent cache
    # only from transformers 5.24 (5.23 builds no cache for a recurrent model other than Mamba2).
    _can_compile_fullgraph = GENERATE_SUPPORTS_RECURRENT_CACHES
    _can_record_outputs = {"hidden_states": PalimpsaDecoderLayer}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # From transformers 5.24 `generate` builds `DynamicCache(config=...)` / `StaticCache` of linear-attention
        # layers (config.layer_types). On 5.23 it builds none and `PalimpsaModel.forward` builds a PalimpsaCache.
        return GENERATE_SUPPORTS_RECURRENT_CACHES

    def compile(self, *args, **kwargs):
        """`nn.Module.compile`, after deciding (building, the first time on this machine) the C++ CPU ops: a trace
        only reads that decision, so a model compiled before any eager call would otherwise trace the PyTorch path.
        (`torch.compile(model)` traces what the first eager call decided, or the PyTorch path before one.)"""
        uses_cpu_ops(MEMORY_OPS[self.config._attn_implementation], self.device)
        return super().compile(*args, **kwargs)

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """transformers' validation hook for `attn_implementation`: the names of `MEMORY_OPS` only ("eager" when
        none is requested), so every path of the memory op can be chosen and any other name is refused here."""
        if requested_attention is None:
            return "eager"
        if requested_attention not in MEMORY_OPS:
            raise ValueError(
                f"Palimpsa has no attention implementation {requested_attention!r}: its layers are a recurrent memory. "
                f"Choose one of {list(MEMORY_OPS)}: 'eager' (the PyTorch paths, the default), 'palimpsa_reference' "
                "(the paper's token loop), 'palimpsa_chunk' (the chunked PyTorch scan), 'palimpsa_cpu' (the fused C++ "
                f"loop, CPU) or {TRITON_ATTN_IMPLEMENTATION!r} (the Triton kernels, CUDA)."
            )
        return requested_attention

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # Linear/Conv1d ~ N(0, initializer_range), embeddings, norms = 1
        if isinstance(module, GatedRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (PalimpsaMixer, MetaMamba2Mixer)):
            module.init_parameters()

    def remote_code_classes(self) -> dict[str, type]:
        return {"AutoModel": PalimpsaModel, "AutoModelForCausalLM": PalimpsaForCausalLM}


class PalimpsaModel(PalimpsaPreTrainedModel):
    def __init__(self, config: PalimpsaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [PalimpsaDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @legacy_cache_name(recurrent=True)
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_uncertainty: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> PalimpsaModelOutput:
        r"""
        cache (`PalimpsaCache` or a `Cache` of linear-attention layers, *optional*): the recurrent state to continue
            from; updated in place (`past_key_values` before transformers 5.24; both names are accepted).
        output_uncertainty (`bool`, defaults to `False`): also return each layer's posterior-variance readout.
        """
        check_model_inputs(self.config, input_ids, inputs_embeds, attention_mask)
        cache = resolve_cache(cache, past_key_values)
        check_cache(cache, self.config.num_hidden_layers)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                "Palimpsa takes a 2-D padding mask [batch, seq_len] (1 = token, 0 = padding); "
                f"got a mask of shape {tuple(attention_mask.shape)}."
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.training and torch.is_grad_enabled() and cache is None:
            use_cache = False  # training never reads the final state back
        if use_cache and cache is None:
            cache = PalimpsaCache(self.config)

        # generate passes the mask of past tokens too; padded positions (0) become no-ops in every layer.
        mask = (
            attention_mask[:, -inputs_embeds.shape[1] :].to(inputs_embeds.dtype) if attention_mask is not None else None
        )
        hidden_states = inputs_embeds
        uncertainties = []
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, uncertainty = decoder_layer(
                hidden_states,
                mask=mask,
                cache=cache,
                output_uncertainty=output_uncertainty,
                **kwargs,
            )
            uncertainties.append(uncertainty)

        hidden_states = self.norm(hidden_states)
        return PalimpsaModelOutput(
            last_hidden_state=hidden_states,
            uncertainties=tuple(uncertainties) if output_uncertainty else None,
            **with_cache(cache),
        )


class PalimpsaForCausalLM(PalimpsaPreTrainedModel, GenerationMixin):
    # No tensor- or pipeline-parallel plan: the tied head would have to be sharded with the embedding.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: PalimpsaConfig):
        super().__init__(config)
        self.model = PalimpsaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ):
        """transformers' preparation, less the padding mask once decoding from the cache: a generated token is never
        padding, and a mask that grows every step would make a compiled forward recompile (as for Mamba2)."""
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            use_cache=use_cache,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None
        return model_inputs

    @legacy_cache_name(recurrent=True)
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_uncertainty: bool = False,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> PalimpsaCausalLMOutput:
        r"""
        cache (`PalimpsaCache`, *optional*): the recurrent state to continue from, updated in place
            (`past_key_values` before transformers 5.24; both names are accepted).
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Targets for the next-token loss; the shift happens inside. Positions set to -100 are ignored.
        logits_to_keep (`int` or `torch.Tensor`, defaults to 0): compute logits only for the last N positions
            (0 keeps all), or for the given indices.
        output_uncertainty (`bool`, defaults to `False`): also return each layer's posterior-variance readout.
        """
        kwargs.pop("position_ids", None)  # no positional encoding: the recurrence orders tokens
        outputs: PalimpsaModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=resolve_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_uncertainty=output_uncertainty,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            check_labels(labels, input_ids, inputs_embeds)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)

        return PalimpsaCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            uncertainties=outputs.uncertainties,
            **with_cache(getattr(outputs, CACHE_NAME)),
        )


__all__ = ["PalimpsaCache", "PalimpsaForCausalLM", "PalimpsaModel", "PalimpsaPreTrainedModel"]
