from .modeling_attn_stream import AttnStreamForCausalLM, AttnStreamModel, AttnStreamPreTrainedModel
from .modeling_palimpsa import PalimpsaCache, PalimpsaForCausalLM, PalimpsaModel, PalimpsaPreTrainedModel

__all__ = ["AttnStreamForCausalLM", "AttnStreamModel", "AttnStreamPreTrainedModel"]
__all__ += ["PalimpsaCache", "PalimpsaForCausalLM", "PalimpsaModel", "PalimpsaPreTrainedModel"]
