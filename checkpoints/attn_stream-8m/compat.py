"""The transformers contracts that changed inside our supported range (transformers >= 5.23), decided once.

transformers 5.24 renamed the cache: `generate` hands it to `forward` as `cache=` (before: `past_key_values=`),
model outputs carry it in a field named `cache`, and `past_key_values` became a deprecated alias (until 5.40).
Our forwards accept both names and our outputs use the installed release's field name, so `generate`, Trainer
and user code get what their release expects, and no deprecation warning comes from our code.

This file ships inside every checkpoint (remote code): it imports only torch and transformers.
"""

import transformers
from packaging.version import Version
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

# The name of the cache argument of `forward` and of the cache field of model outputs on this release.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# From 5.24 `generate` handles a cache made only of linear-attention (recurrent) layers: it builds one from
# `config.layer_types`, never asks it for its length and never turns the padding mask into a 4-D attention mask
# for it. 5.23's `generate` does all three, so a recurrent model must build and describe its cache itself there.
GENERATE_SUPPORTS_RECURRENT_CACHES = Version(transformers.__version__).release >= (5, 24)


def resolve_cache(cache, past_key_values):
    """The cache a forward was given, under either name (`cache` from 5.24, `past_key_values` before)."""
    if past_key_values is None:
        return cache
    if cache is not None and cache is not past_key_values:
        raise ValueError("Got both `cache` and `past_key_values`; pass the cache once (`cache` from 5.24 on).")
    return past_key_values


def legacy_cache_name(forward=None, *, recurrent: bool = False):
    """Decorate a forward taking `cache` and `past_key_values`: on releases that renamed the cache (>= 5.24),
    `past_key_values=` still works but warns, through transformers' own `deprecate_kwarg`, exactly as transformers'
    models do; on 5.23 it is the name `generate` passes, so it stays silent. With `recurrent`, `cache_params=`
    (the name transformers' Mamba models used) is taken too, with the same warning, on every release."""

    def decorate(function):
        if recurrent:
            function = deprecate_kwarg("cache_params", "5.40.0", new_name="cache", raise_if_both_names=True)(function)
        if CACHE_NAME == "cache":
            function = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)(
                function
            )
        return function

    return decorate(forward) if forward is not None else decorate


def with_cache(cache) -> dict:
    """Keyword arguments that put `cache` in a model output under this release's field name."""
    return {CACHE_NAME: cache}


__all__ = ["CACHE_NAME", "GENERATE_SUPPORTS_RECURRENT_CACHES", "legacy_cache_name", "resolve_cache", "with_cache"]
