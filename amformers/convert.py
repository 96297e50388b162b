"""Convert checkpoints of other architectures into amformers models, weights unchanged."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Mamba2ForCausalLM

from .configuration import AttnStreamConfig, PalimpsaConfig
from .model_folder import require_model_folder
from .modeling import AttnStreamForCausalLM, PalimpsaForCausalLM

# LlamaConfig fields that mean the same in AttnStreamConfig.
_LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "rope_parameters",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)


def _model_from(model_or_path, model_class):
    """The model itself, or `model_class` loaded in fp32 from a path."""
    if isinstance(model_or_path, (str, Path)):
        path = require_model_folder(model_or_path, allow_hub_id=True)  # a local folder needs its config.json
        return model_class.from_pretrained(path, dtype=torch.float32)
    if isinstance(model_or_path, model_class):
        return model_or_path
    raise TypeError(f"Expected a {model_class.__name__} or a path, got {type(model_or_path).__name__}.")


def llama_to_attn_stream(model_or_path: LlamaForCausalLM | str | Path, **stream_settings) -> AttnStreamForCausalLM:
    """Build an `AttnStreamForCausalLM` carrying a Llama model's weights.

    `stream_settings` are AttnStream stream fields (`attention_stream`, `stream_source`, `stream_weighting`,
    `stream_init`). With `attention_stream="none"`, or learned weights with `stream_init="identity"`, the
    result computes exactly what the Llama model does, and the stream weights can then be fine-tuned.
    """
    allowed = {"attention_stream", "stream_source", "stream_weighting", "stream_init"}
    unknown = set(stream_settings) - allowed
    if unknown:
        raise ValueError(f"Unknown stream settings {sorted(unknown)}; expected some of {sorted(allowed)}.")
    llama = _model_from(model_or_path, LlamaForCausalLM)
    llama_config: LlamaConfig = llama.config
    if getattr(llama_config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError("Llama checkpoints with pretraining_tp > 1 are not supported.")
    fields = {name: getattr(llama_config, name) for name in _LLAMA_FIELDS if hasattr(llama_config, name)}
    config = AttnStreamConfig(**fields, **stream_settings)
    model = AttnStreamForCausalLM(config).to(dtype=llama.dtype, device=llama.device)
    missing, unexpected = model.load_state_dict(llama.state_dict(), strict=False)
    # Only the new stream weights may be missing; they keep their initialisation.
    missing = [name for name in missing if not name.endswith("stream_weights")]
    if missing or unexpected:
        raise ValueError(f"Llama weights do not fit AttnStream: missing {missing}, unexpected {unexpected}.")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.train(llama.training)


# Mamba2 parameter-name prefixes -> Palimpsa's (mixer weights keep their names, see MetaMamba2Mixer).
_MAMBA2_PREFIXES = (
    ("backbone.embeddings.", "model.embed_tokens."),
    ("backbone.norm_f.", "model.norm."),
    ("backbone.layers.", "model.layers."),
)


def _rename_mamba2_key(name: str) -> str:
    for old, new in _MAMBA2_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old) :]
    if name.startswith("model.layers.") and name.endswith(".norm.weight") and ".mixer." not in name:
        name = name[: -len("norm.weight")] + "input_layernorm.weight"  # the block's pre-norm
    return name


def mamba2_to_palimpsa(model_or_path: Mamba2ForCausalLM | str | Path, metaplastic: bool = True) -> PalimpsaForCausalLM:
    """Build a Meta-Mamba2 `PalimpsaForCausalLM` (`mixer="mamba2"`) carrying a transformers Mamba2 model's weights.

    With `metaplastic=False` the result computes exactly what the Mamba2 model does (the precision stays at the
    prior 1). With `metaplastic=True` the importance pathway (b_rank_proj, b_proj, b_scale) is added with the
    official fine-tuning initialisation, so the precision starts to move and the outputs leave Mamba2's a little:
    this is the starting point for fine-tuning an existing Mamba2 checkpoint into a metaplastic one.
    """
    mamba2 = _model_from(model_or_path, Mamba2ForCausalLM)
    c = mamba2.config
    if c.hidden_act != "silu":
        raise ValueError(f"Only Mamba2 models with hidden_act='silu' convert, got {c.hidden_act!r}.")
    config = PalimpsaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_hidden_layers,
        num_heads=c.num_heads,
        head_dim=c.state_size,  # the key dimension is Mamba2's state size
        expand_v=c.head_dim / c.state_size,  # Mamba2's head_dim is the value dimension
        conv_size=c.conv_kernel,
        intermediate_size=0,  # Mamba2 blocks have no MLP
        metaplastic=metaplastic,
        mixer="mamba2",
        n_groups=c.n_groups,
        conv_bias=c.use_conv_bias,
        use_bias=c.use_bias,
        time_step_min=c.time_step_min,
        time_step_max=c.time_step_max,
        time_step_floor=c.time_step_floor,
        time_step_limit=tuple(c.time_step_limit),
        residual_in_fp32=c.residual_in_fp32,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.layer_norm_epsilon,
        use_cache=c.use_cache,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
    )
    model = PalimpsaForCausalLM(config).to(dtype=mamba2.dtype, device=mamba2.device)
    state_dict = {_rename_mamba2_key(name): tensor for name, tensor in mamba2.state_dict().items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # Only the new precision parameters may be missing; they keep (or get) their initialisation.
    new = ("b_rank_proj.weight", "b_proj.weight", "b_scale", "log_prior_precision")
    missing = [name for name in missing if not name.endswith(new)]
    if missing or unexpected:
        raise ValueError(f"Mamba2 weights do not fit Meta-Mamba2: missing {missing}, unexpected {unexpected}.")
    for layer in model.model.layers:
        layer.mixer.init_importance(finetuning=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.train(mamba2.training)


__all__ = ["llama_to_attn_stream", "mamba2_to_palimpsa"]
