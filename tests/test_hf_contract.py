"""What transformers expects of every causal LM, checked for both families on the installed transformers release.

These are our own tests of the behaviours transformers' common model tests (ModelTesterMixin,
GenerationTesterMixin) cover: the cache under the name the release passes, cached generation equal to uncached
in every decoding mode, continuing from a returned cache, generating from `inputs_embeds`, left padding, the
static cache, saving and loading, initialisation from the meta device, both gradient-checkpointing modes,
attention backends, `torch.compile` and `torch.export`, and no host synchronisation in the forward pass.
`make test-newest` runs this module again on the newest transformers the registry serves.
"""

import subprocess
import sys

import pytest
import torch
import transformers
from torch.overrides import TorchFunctionMode
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import amformers
from amformers.modeling.compat import CACHE_NAME, GENERATE_SUPPORTS_RECURRENT_CACHES

MODELS = {
    "llama_like": (amformers.AttnStreamConfig, amformers.AttnStreamForCausalLM, {"attention_stream": "none"}),
    "values_stream": (amformers.AttnStreamConfig, amformers.AttnStreamForCausalLM, {"attention_stream": "values"}),
    "keys_learned": (
        amformers.AttnStreamConfig,
        amformers.AttnStreamForCausalLM,
        {"attention_stream": "keys", "stream_weighting": "learned"},
    ),
    "palimpsa": (amformers.PalimpsaConfig, amformers.PalimpsaForCausalLM, {}),
    "not_palimpsa": (amformers.PalimpsaConfig, amformers.PalimpsaForCausalLM, {"metaplastic": False}),
    "meta_mamba2": (amformers.PalimpsaConfig, amformers.PalimpsaForCausalLM, {"mixer": "mamba2"}),
}
ATTENTION = ("llama_like", "values_stream", "keys_learned")
COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SIZES = {
    amformers.AttnStreamConfig: dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=40),
    amformers.PalimpsaConfig: dict(num_heads=2, head_dim=8, intermediate_size=40, initializer_range=0.1),
}


def tiny(name: str, **overrides):
    config_class, model_class, variant = MODELS[name]
    torch.manual_seed(0)
    config = config_class(**{**COMMON, **SIZES[config_class], **variant, **overrides})
    return model_class(config).eval()


def prompt(batch=2, length=7, seed=1):
    return torch.randint(3, COMMON["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_of(output):
    return getattr(output, CACHE_NAME)


GREEDY = dict(do_sample=False, max_new_tokens=6, pad_token_id=0, eos_token_id=-1)


# --------------------------------------------------------------------------------------------------------------
# The cache contract


@pytest.mark.parametrize("name", MODELS)
def test_forward_takes_the_cache_under_either_name(name):
    """`cache=` (transformers >= 5.24) and `past_key_values=` (before) continue the same state."""
    model, x = tiny(name), prompt()
    with torch.no_grad():
        full = model(x).logits
        for keyword in ("cache", "past_key_values"):
            out = model(x[:, :4], use_cache=True)
            assert cache_of(out) is not None
            step = model(x[:, 4:], use_cache=True, **{keyword: cache_of(out)})
            torch.testing.assert_close(step.logits, full[:, 4:], atol=2e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="once|Both"):
            model(x, cache=cache_of(out), past_key_values=DynamicCache())


@pytest.mark.parametrize("name", MODELS)
def test_cached_generation_equals_uncached_in_every_mode(name):
    model, x = tiny(name), prompt()
    for mode in (dict(), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)):
        kwargs = dict(GREEDY, **mode, return_dict_in_generate=True, output_scores=True)
        cached = model.generate(x, **kwargs)
        uncached = model.generate(x, **kwargs, use_cache=False)
        assert torch.equal(cached.sequences, uncached.sequences), mode
        assert len(cached.scores) == GREEDY["max_new_tokens"]
        if not mode:
            assert isinstance(cache_of(cached), transformers.Cache)
    sampled = [model.generate(x, do_sample=True, top_k=20, max_new_tokens=6, use_cache=c) for c in (True, False)]
    torch.manual_seed(3)
    again = model.generate(x, do_sample=True, top_k=20, max_new_tokens=6)
    torch.manual_seed(3)
    assert torch.equal(again, model.generate(x, do_sample=True, top_k=20, max_new_tokens=6))
    assert all(s.shape == (2, 13) for s in sampled)


@pytest.mark.parametrize("name", MODELS)
def test_generation_continues_from_a_returned_cache(name):
    """Generate 3 tokens, then 3 more from the returned cache: the same as 6 tokens in one call."""
    model, x = tiny(name), prompt()
    kwargs = dict(GREEDY, return_dict_in_generate=True)
    whole = model.generate(x, **dict(kwargs, max_new_tokens=6)).sequences
    first = model.generate(x, **dict(kwargs, max_new_tokens=3))
    cache = cache_of(first)
    if GENERATE_SUPPORTS_RECURRENT_CACHES and all(cache.is_linear):
        # From transformers 5.24 a recurrent cache holds no positions to slice by: pass only the new tokens
        # (as for transformers' own Mamba2); the attention mask still spans everything seen.
        mask = torch.ones_like(first.sequences)
        more = model.generate(first.sequences[:, -1:], attention_mask=mask, **{CACHE_NAME: cache}, **kwargs)
        continued = torch.cat([first.sequences[:, :-1], more.sequences[:, :4]], dim=1)
    else:
        continued = model.generate(first.sequences, **{CACHE_NAME: cache}, **dict(kwargs, max_new_tokens=3))
        continued = continued.sequences
    assert torch.equal(continued, whole)


@pytest.mark.parametrize("name", MODELS)
def test_generation_from_inputs_embeds(name):
    model, x = tiny(name), prompt()
    embeds = model.get_input_embeddings()(x)
    from_ids = model.generate(x, **GREEDY)[:, x.shape[1] :]
    from_embeds = model.generate(inputs_embeds=embeds, **GREEDY)
    assert torch.equal(from_embeds, from_ids)
    with_both = model.generate(x, inputs_embeds=embeds, **GREEDY)
    assert torch.equal(with_both[:, x.shape[1] :], from_ids)


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch_generates_like_each_prompt_alone(name):
    model = tiny(name)
    short, long = prompt(1, 4, seed=5), prompt(1, 7, seed=6)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    together = model.generate(batch, attention_mask=mask, **GREEDY)[:, 7:]
    assert torch.equal(together[0], model.generate(short, **GREEDY)[0, 4:])
    assert torch.equal(together[1], model.generate(long, **GREEDY)[0, 7:])


@pytest.mark.parametrize("name", MODELS)
def test_static_cache_generates_like_the_dynamic_one(name):
    model, x = tiny(name), prompt()
    if name not in ATTENTION and not GENERATE_SUPPORTS_RECURRENT_CACHES:
        pytest.skip("transformers 5.23's generate builds no static cache for a recurrent model (it says so)")
    static = model.generate(x, cache_implementation="static", return_dict_in_generate=True, **GREEDY)
    assert type(cache_of(static)).__name__ == "StaticCache"
    assert torch.equal(static.sequences, model.generate(x, **GREEDY))


@pytest.mark.parametrize("name", ["palimpsa", "meta_mamba2"])
def test_palimpsa_takes_a_padding_mask_in_half_precision(name):
    model, x = tiny(name).to(torch.bfloat16), prompt()
    with torch.no_grad():
        out = model(x, attention_mask=torch.ones_like(x)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_palimpsa_takes_mamba_cache_name_with_a_warning():
    """`cache_params=` (transformers' Mamba name) continues the state and warns that it is deprecated."""
    model, x = tiny("palimpsa"), prompt()
    with torch.no_grad():
        full = model(x).logits
        cache = cache_of(model(x[:, :4], use_cache=True))
        with pytest.warns(FutureWarning, match="cache_params"):
            step = model(x[:, 4:], cache_params=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 4:], atol=2e-5, rtol=1e-4)


def test_remote_code_is_written_for_a_wrapped_model_class(tmp_path):
    """FSDP2's `fully_shard` swaps the model's class for a subclass defined in torch: saving must still ship ours."""
    model = tiny("values_stream")
    model.__class__ = type("Wrapped" + type(model).__name__, (type(model),), {"__module__": "torch.fake_wrapper"})
    model.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_attn_stream.py").is_file()


def test_palimpsa_runs_on_transformers_recurrent_caches():
    """`DynamicCache(config=...)` builds linear-attention layers from `config.layer_types`; the model fills it."""
    model, x = tiny("palimpsa"), prompt()
    assert model.config.layer_types == ["linear_attention"] * 3
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(x).logits
        model(x[:, :5], cache=cache, use_cache=True)
        step = model(x[:, 5:], cache=cache, use_cache=True).logits
    torch.testing.assert_close(step, full[:, 5:], atol=2e-5, rtol=1e-4)
    assert all(cache.is_linear) and cache.get_recurrent_state(0).shape == (2, 2, 2, 16, 8)


def test_no_deprecation_warning_from_our_code():
    """A normal generate / forward with cache logs nothing about deprecated cache names (fresh process: the
    warnings are logged once per process)."""
    script = r"""
import logging, warnings, torch, transformers
import amformers
records = []
class Keep(logging.Handler):
    def emit(self, record): records.append(record.getMessage())
transformers.utils.logging.get_logger("transformers").addHandler(Keep())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    for config in (amformers.AttnStreamConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=20, pad_token_id=0),
                   amformers.PalimpsaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_heads=2,
                   head_dim=8, intermediate_size=20, pad_token_id=0)):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        x = torch.randint(3, 50, (2, 5))
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, do_sample=False)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=3, num_beams=2, do_sample=False)
        out = model(x, use_cache=True)
        getattr(out, "cache" if "cache" in out else "past_key_values")
messages = records + [str(w.message) for w in caught]
bad = [m for m in messages if "deprecat" in m.lower() or "past_key_values" in m]
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------------
# Saving, loading, initialisation, training


@pytest.mark.parametrize("name", ["values_stream", "palimpsa", "meta_mamba2"])
def test_initialisation_from_the_meta_device_sets_every_weight_and_buffer(name):
    """Built on the meta device then initialised (what `from_pretrained` does for missing weights), every
    parameter and buffer has a real value, equal to an ordinary initialisation for the deterministic ones."""
    reference = tiny(name)
    with torch.device("meta"):
        model = type(reference)(reference.config)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    for (key, value), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.isfinite(value).all(), key
        if "prior" in key or key.endswith((".D", "norm.weight", "stream_weights")):
            torch.testing.assert_close(value, expected, msg=key)


@pytest.mark.parametrize("name", MODELS)
def test_save_and_load_round_trip_with_and_without_the_package(name, tmp_path):
    model, x = tiny(name), prompt()
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(loaded(x).logits, expected, atol=0, rtol=0)
        torch.testing.assert_close(remote.eval()(x).logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(name, use_reentrant):
    model, x = tiny(name), prompt()
    model.train()
    model(x, labels=x).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # `activation_checkpointing_enable` from transformers 5.24, `gradient_checkpointing_enable` before
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model(x, labels=x, use_cache=True).loss.backward()  # use_cache is switched off under checkpointing
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("name", ATTENTION)
def test_attention_implementations_agree(name):
    x = prompt()
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    outputs = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        model = tiny(name, attn_implementation=implementation)
        with torch.no_grad():
            outputs[implementation] = model(x, attention_mask=mask).logits[mask.bool()]
    for implementation in ("sdpa", "flex_attention"):
        torch.testing.assert_close(outputs[implementation], outputs["eager"], atol=2e-5, rtol=1e-4)


def test_warns_once_past_max_position_embeddings(caplog):
    model = tiny("values_stream", max_position_embeddings=8)
    logger = transformers.utils.logging.get_logger("transformers")
    logger.propagate, was = True, logger.propagate
    try:
        with torch.no_grad():
            model(prompt(1, 8))
            assert "max_position_embeddings" not in caplog.text
            model(prompt(1, 9))
            model(prompt(1, 9))
    finally:
        logger.propagate = was
    assert caplog.text.count("max_position_embeddings") == 1


# --------------------------------------------------------------------------------------------------------------
# Compilation, export and host synchronisation


class CountHostReads(TorchFunctionMode):
    """Counts the tensor -> Python reads (`.item()`, `bool(t)`, `int(t)`, `.tolist()`): each one is a host
    synchronisation on a GPU and a data-dependent guard under `torch.compile`."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def host_reads(model, x, **kwargs) -> list[str]:
    with torch.no_grad(), CountHostReads() as counter:
        model(x, **kwargs)
    return counter.reads


@pytest.mark.parametrize("name", MODELS)
def test_forward_reads_no_more_from_the_device_than_llama(name):
    """Counted per forward, with and without a padding mask, while decoding too: never more than Llama's."""
    torch.manual_seed(0)
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40)
    ).eval()
    model, x = tiny(name), prompt()
    mask = torch.ones_like(x)
    for kwargs in (dict(), dict(attention_mask=mask), dict(use_cache=True)):
        assert len(host_reads(model, x, **kwargs)) <= len(host_reads(llama, x, **kwargs)), kwargs
    with torch.no_grad():
        cache = cache_of(model(x, use_cache=True))
        llama_cache = cache_of(llama(x, use_cache=True))
    step = x[:, :1]
    ours = host_reads(model, step, use_cache=True, **{CACHE_NAME: cache})
    assert len(ours) <= len(host_reads(llama, step, use_cache=True, **{CACHE_NAME: llama_cache})), ours


@pytest.mark.parametrize("name", ["values_stream", "llama_like"])
def test_compiled_static_cache_generation_equals_eager(name):
    """`cache_implementation="static"` under a `torch.compile(fullgraph=True)` forward, as for Llama."""
    model, x = tiny(name), prompt()
    eager = model.generate(x, cache_implementation="static", **GREEDY)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    compiled = model.generate(x, cache_implementation="static", **GREEDY)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("name", ["values_stream", "palimpsa", "not_palimpsa"])
def test_forward_compiles_with_fullgraph(name):
    model, x = tiny(name), prompt()
    with torch.no_grad():
        expected = model(x).logits
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x).logits, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["values_stream", "llama_like"])
def test_torch_export_matches_eager(name):
    model, x = tiny(name), prompt()
    exported = torch.export.export(model, args=(), kwargs={"input_ids": x, "use_cache": False})
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(input_ids=x, use_cache=False).logits, model(x).logits)
