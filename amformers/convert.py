"""Convert checkpoints of other architectures into amformers models, weights unchanged."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration import AttnStreamConfig
from .modeling import AttnStreamForCausalLM

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


def llama_to_attn_stream(model_or_path: LlamaForCausalLM | str | Path, **stream_settings) -> AttnStreamForCausalLM:
    """Build an `AttnStreamForCausalLM` carrying a Llama model's weights.

    `stream_settings` are AttnStream stream fields (`attention_stream`, `stream_source`, `stream_weights`,
    `stream_init`). With `attention_stream="none"`, or learned weights with `stream_init="identity"`, the
    result computes exactly what the Llama model does, and the stream weights can then be fine-tuned.
    """
    allowed = {"attention_stream", "stream_source", "stream_weights", "stream_init"}
    unknown = set(stream_settings) - allowed
    if unknown:
        raise ValueError(f"Unknown stream settings {sorted(unknown)}; expected some of {sorted(allowed)}.")
    if isinstance(model_or_path, (str, Path)):
        llama = LlamaForCausalLM.from_pretrained(model_or_path, dtype=torch.float32)
    elif isinstance(model_or_path, LlamaForCausalLM):
        llama = model_or_path
    else:
        raise TypeError(f"Expected a LlamaForCausalLM or a path, got {type(model_or_path).__name__}.")
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


__all__ = ["llama_to_attn_stream"]
