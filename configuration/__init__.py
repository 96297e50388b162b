from .configuration_attn_stream import AttnStreamConfig
from .configuration_palimpsa import PalimpsaConfig

__all__ = ["AttnStreamConfig"]
__all__ += ["PalimpsaConfig"]
