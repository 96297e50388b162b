from .configuration_attn_stream import AttnStreamConfig

__all__ = ["AttnStreamConfig"]
