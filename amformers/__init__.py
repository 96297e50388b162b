"""amformers: associative-memory language models for Hugging Face transformers.

Importing the package registers every model family with the Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works on our checkpoints without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import AttnStreamConfig, PalimpsaConfig
from .modeling import AttnStreamForCausalLM, AttnStreamModel, PalimpsaForCausalLM, PalimpsaModel
from .modeling.kernels.triton_switch import register_triton_attention

__version__ = "0.1.0"

for _config, _model, _causal_lm in (
    (AttnStreamConfig, AttnStreamModel, AttnStreamForCausalLM),
    (PalimpsaConfig, PalimpsaModel, PalimpsaForCausalLM),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForCausalLM.register(_config, _causal_lm, exist_ok=True)

# attn_implementation="amformers_triton" (Triton itself is imported only when a kernel runs).
register_triton_attention()

__all__ = ["AttnStreamConfig", "AttnStreamForCausalLM", "AttnStreamModel", "__version__"]
__all__ += ["PalimpsaConfig", "PalimpsaForCausalLM", "PalimpsaModel"]
