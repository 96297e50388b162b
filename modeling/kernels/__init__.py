"""Kernels: functions of tensors and numbers only (never configs or model classes).

Each fast path sits beside a plain reference implementation and a test that holds the two equal.
"""

from .palimpsa import palimpsa_attention

__all__ = ["palimpsa_attention"]
