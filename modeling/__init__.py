from .modeling_attn_stream import AttnStreamForCausalLM, AttnStreamModel, AttnStreamPreTrainedModel

__all__ = ["AttnStreamForCausalLM", "AttnStreamModel", "AttnStreamPreTrainedModel"]
