"""Palimpsa as a transformers model: the layer against its equations, caching, padding, and the integrations."""

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache

import amformers
from amformers import PalimpsaConfig, PalimpsaForCausalLM, PalimpsaModel
from amformers.modeling.compat import CACHE_NAME
from amformers.modeling.kernels.palimpsa import palimpsa_reference
from amformers.modeling.palimpsa_cache import PalimpsaCache

VARIANTS = {
    "palimpsa": {},
    "not_palimpsa": {"metaplastic": False},
    "paper_gates": {"gates": "paper"},
    "meta_mamba2": {"mixer": "mamba2", "n_groups": 2, "intermediate_size": 0},
    "mamba2": {"mixer": "mamba2", "metaplastic": False},
}


def memory(output, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory (mu, I) of `layer` in a model output's cache."""
    return tuple(getattr(output, CACHE_NAME).get_recurrent_state(layer).unbind(1))


def tiny_config(**overrides) -> PalimpsaConfig:
    fields = dict(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=2,
        head_dim=8,
        expand_v=1.5,
        intermediate_size=48,
        beta_rank=4,
        initializer_range=0.2,  # peaked logits, so greedy decoding has no near-ties
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return PalimpsaConfig(**fields)


def tiny_model(**overrides) -> PalimpsaForCausalLM:
    torch.manual_seed(0)
    model = PalimpsaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # gates away from their init, so a wrong gate shows (and I moves visibly)
        for name, p in model.named_parameters():
            if name.endswith(("A_log", "dt_bias", "b_scale", "log_window", ".D")):
                p.add_(torch.randn_like(p) * 0.5)
    return model


def ids(batch=2, length=11, vocab=320, seed=1):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# The layer against its equations, written out plainly (the official code's layer and the paper's gates).


def reference_mixer(mixer, h):
    """PalimpsaMixer by hand: convs, L2 norm, gates, the token-loop recurrence, D skip, gated norm."""
    cfg = mixer.config
    B, T, _ = h.shape
    H, K, V = cfg.num_heads, cfg.head_dim, cfg.value_dim

    def conv(x, layer):  # causal depthwise conv by explicit sums over the last conv_size inputs
        w = layer.weight[:, 0]  # [C, width]
        padded = F.pad(x, (0, 0, w.shape[1] - 1, 0))
        return F.silu(sum(padded[:, i : i + T] * w[:, i] for i in range(w.shape[1])))

    def unit(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)

    q = unit(conv(mixer.q_proj(h), mixer.q_conv1d).view(B, T, H, K))
    k = unit(conv(mixer.k_proj(h), mixer.k_conv1d).view(B, T, H, K))
    x = conv(mixer.v_proj(h), mixer.v_conv1d).view(B, T, H, V)
    importance = torch.sigmoid(mixer.b_proj(mixer.b_rank_proj(h))).view(B, T, H, V)
    if cfg.gates == "paper":
        gamma = torch.sigmoid(mixer.gamma_proj(h))
        alpha = 1 - gamma / (cfg.window_init * mixer.log_window.exp())
        beta = gamma[..., None] * importance
        v = beta * x
    else:
        dt = F.softplus(mixer.dt_proj(h) + mixer.dt_bias)
        alpha = torch.exp(-dt * mixer.A_log.exp())
        gate = torch.sigmoid(mixer.bs_proj(h))[..., None]
        beta = importance * F.softplus(mixer.b_scale)[:, None] * gate
        v = x * gate
    o, _ = palimpsa_reference(q, k, v, beta, alpha.log(), mixer.log_prior_precision.exp())
    o = o + mixer.D[:, None] * x
    g = mixer.g_proj(h).view(B, T, H, V)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * mixer.o_norm.weight * F.silu(g)
    return mixer.o_proj(o.reshape(B, T, H * V))


@pytest.mark.parametrize("gates", ["official", "paper"])
def test_mixer_matches_its_equations(gates):
    model = tiny_model(gates=gates)
    mixer = model.model.layers[0].mixer
    h = torch.randn(2, 13, 32)
    with torch.no_grad():
        out, _ = mixer(h)
        torch.testing.assert_close(out, reference_mixer(mixer, h), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["palimpsa", "not_palimpsa", "paper_gates"])
def test_fused_input_projection_equals_each_layer_and_spares_hooks(variant):
    """The layer's input projections run as one product over stacked weights; a hook (or an adapter) on any of them
    makes each run itself, so the hook sees its call. Both give the same outputs and gradients."""
    model = tiny_model(**VARIANTS[variant]).train()
    mixer = model.model.layers[0].mixer
    assert len(mixer.input_projections) == (7 if variant == "palimpsa" else 6)
    h = torch.randn(2, 13, 32, requires_grad=True)

    def outputs_and_gradients():
        out, _ = mixer(h)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), [h, *mixer.parameters()])
        return out, grads

    fused = outputs_and_gradients()
    seen = []
    handle = mixer.k_proj.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    each = outputs_and_gradients()
    handle.remove()
    assert seen == [torch.Size([2, 13, mixer.num_heads * mixer.head_dim])]
    torch.testing.assert_close(fused[0], each[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(fused[1], each[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_official_initialisation():
    model = PalimpsaForCausalLM(tiny_config(num_heads=64, hidden_size=64, head_dim=4, initializer_range=0.02))
    mixer = model.model.layers[0].mixer
    A = mixer.A_log.exp()
    dt = F.softplus(mixer.dt_bias)
    assert A.min() > 0 and A.max() <= 16
    assert dt.min() >= 1e-3 * 0.99 and dt.max() <= 0.1 * 1.01
    assert torch.equal(mixer.b_scale, torch.ones(64)) and torch.equal(mixer.D, torch.ones(64))
    assert torch.equal(mixer.log_prior_precision, torch.zeros(64))  # Ip = 1, frozen: a buffer, not a parameter
    assert not any("prior" in name for name, _ in model.named_parameters())
    assert mixer.b_proj.weight.abs().max() <= 4**-0.5
    assert abs(mixer.q_proj.weight.std().item() - 0.02) < 0.004
    paper = PalimpsaForCausalLM(tiny_config(gates="paper", num_heads=64, hidden_size=64, head_dim=4)).model
    window = paper.layers[0].mixer.log_window
    assert window.min() >= -1.3863 and window.max() <= 1.3863


def test_not_palimpsa_keeps_the_prior_and_has_no_importance_parameters():
    model = tiny_model(metaplastic=False)
    assert not any("b_proj" in name or "b_scale" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        out = model(ids(), use_cache=True)
    for layer in range(model.config.num_hidden_layers):
        precision = memory(out, layer)[1]
        torch.testing.assert_close(precision, torch.ones_like(precision))
    palimpsa = tiny_model()
    with torch.no_grad():
        state = memory(palimpsa(ids(), use_cache=True))[1]
    assert state.max() > 1.01  # the metaplastic twin's precision does move


def test_gradients_reach_every_trainable_parameter():
    for variant in VARIANTS.values():
        model = tiny_model(**variant).train()
        model(ids(), labels=ids()).loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                assert p.grad.abs().sum() > 0 or name == "model.embed_tokens.weight", name


# --------------------------------------------------------------------------------------------------------------
# Decoding: the cache, generate, padding


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_token_by_token_decoding_equals_full_forward(variant):
    model = tiny_model(**VARIANTS[variant])
    x = ids(2, 15)
    with torch.no_grad():
        full = model(x, output_uncertainty=True)
        prefill = model(x[:, :6], use_cache=True, output_uncertainty=True)
        cache, steps, variances = getattr(prefill, CACHE_NAME), [prefill.logits], [prefill.uncertainties[1]]
        for t in range(6, 15):
            out = model(x[:, t : t + 1], cache=cache, use_cache=True, output_uncertainty=True)
            steps.append(out.logits)
            variances.append(out.uncertainties[1])
    assert cache.get_seq_length() == 15
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat(variances, 1), full.uncertainties[1], atol=1e-5, rtol=1e-4)


def test_cache_size_does_not_grow_with_context():
    model = tiny_model()
    with torch.no_grad():
        cache = getattr(model(ids(1, 8), use_cache=True), CACHE_NAME)
        size_at_8 = cache.nbytes()
        for t in range(40):
            model(ids(1, 1, seed=t), cache=cache, use_cache=True)
    assert cache.nbytes() == size_at_8 and cache.get_seq_length() == 48
    cfg = model.config
    state_bytes = 2 * cfg.num_hidden_layers * 4 * cfg.num_heads * cfg.value_dim * cfg.head_dim
    conv_bytes = cfg.num_hidden_layers * 4 * (2 * cfg.num_heads * cfg.head_dim + cfg.num_heads * cfg.value_dim) * 3
    assert size_at_8 == state_bytes + conv_bytes


@pytest.mark.parametrize("variant", ["palimpsa", "meta_mamba2"])
def test_greedy_generation_with_and_without_cache(variant):
    model = tiny_model(**VARIANTS[variant])
    prompt = ids(2, 6)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("variant", ["palimpsa", "not_palimpsa", "meta_mamba2"])
def test_left_padded_batch_matches_each_prompt_alone(variant):
    model = tiny_model(**VARIANTS[variant])
    prompts = [ids(1, 9, seed=5)[0], ids(1, 4, seed=6)[0]]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 9 - len(prompt) :] = prompt
        mask[row, 9 - len(prompt) :] = 1
    with torch.no_grad():  # the state after the prompt is untouched by the padding
        padded = model(batch, attention_mask=mask, use_cache=True)
        alone = model(prompts[1][None], use_cache=True)
    for layer in range(model.config.num_hidden_layers):
        for a, b in zip(memory(padded, layer), memory(alone, layer)):
            torch.testing.assert_close(a[1:], b, atol=1e-6, rtol=1e-5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, 9:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)[0, len(prompt) :]
        # a sequence that stopped at eos alone is padded in the batch
        assert torch.equal(together[row, : len(alone)], alone), row
        assert (together[row, len(alone) :] == 0).all(), row


def test_beam_search_and_sampling():
    model = tiny_model()
    prompt = ids(2, 5)
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=4, pad_token_id=0)
    beams = model.generate(prompt, **kwargs)
    assert beams.shape == (4, 9)
    assert torch.equal(beams, model.generate(prompt, use_cache=False, **kwargs))  # the cache follows its beams
    torch.manual_seed(0)
    sampled = model.generate(prompt, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=4, pad_token_id=0)
    assert sampled.shape == (2, 9) and int(sampled.max()) < 320


def test_output_uncertainty_is_the_posterior_variance_readout():
    model = tiny_model()
    with torch.no_grad():
        out = model(ids(2, 7), output_uncertainty=True, output_hidden_states=True)
    cfg = model.config
    assert len(out.uncertainties) == cfg.num_hidden_layers
    for var in out.uncertainties:
        assert var.shape == (2, 7, cfg.num_heads, cfg.value_dim)
        assert (var > 0).all()
    assert len(out.hidden_states) == cfg.num_hidden_layers + 1
    assert model(ids(2, 7)).uncertainties is None


def test_long_context_forward_stays_finite():
    """65,536 tokens through a tiny model under bf16 autocast (the op alone, fp32 too: test_palimpsa_op.py)."""
    model = tiny_model(num_hidden_layers=1, intermediate_size=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids(1, 65536), logits_to_keep=64, use_cache=True)
    assert torch.isfinite(out.logits).all()
    mu, precision = memory(out)
    assert mu.dtype == torch.float32 and torch.isfinite(mu).all() and torch.isfinite(precision).all()


# --------------------------------------------------------------------------------------------------------------
# Errors, saving, loading, the Auto classes, the kernel switch


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"mixer": "rwkv"}, "mixer"),
        ({"gates": "learned"}, "gates"),
        ({"mixer": "mamba2", "gates": "paper"}, "paper"),
        ({"expand_v": 1.3}, "expand_v"),
        ({"prior_precision": 0.0}, "prior_precision"),
        ({"mixer": "mamba2", "n_groups": 3}, "n_groups"),
        ({"gates": "paper", "window_init": 2.0}, "window_init"),
        ({"intermediate_size": -1}, "intermediate_size"),
    ],
)
def test_invalid_config_raises_clear_error(overrides, message):
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        tiny_config(**overrides)


def test_invalid_inputs_raise_clear_errors():
    model = tiny_model()
    x = ids()
    with pytest.raises(RuntimeError, match="vocab_size"):  # a device-side assert: no host sync
        model(torch.full((1, 3), 320))
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 0"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(x, attention_mask=torch.ones(2, 1, 11, 11))
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(3, 11))
    with pytest.raises(TypeError, match="PalimpsaCache"):
        model(x, cache=DynamicCache())  # attention layers cannot hold a recurrent state
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :5])


@pytest.mark.parametrize(
    "name, expected_op",
    [
        ("eager", "auto"),
        ("palimpsa_reference", "reference"),
        ("palimpsa_chunk", "chunk"),
        ("palimpsa_cpu", "cpu"),
        ("amformers_triton", "triton"),
    ],
)
def test_attn_implementation_picks_the_memory_op(name, expected_op, monkeypatch, tmp_path):
    """Every path of the op can be chosen through the config, from_pretrained or set_attn_implementation."""
    from amformers.modeling import modeling_palimpsa

    seen = []
    op = modeling_palimpsa.palimpsa_attention
    monkeypatch.setattr(modeling_palimpsa, "palimpsa_attention", lambda *a, **k: seen.append(k["impl"]) or op(*a, **k))
    model = tiny_model()
    assert model.config._attn_implementation == "eager"  # the default: the PyTorch paths
    model.set_attn_implementation(name)
    model.save_pretrained(tmp_path)
    loaded = PalimpsaForCausalLM.from_pretrained(tmp_path, attn_implementation=name)
    from_config = PalimpsaForCausalLM(PalimpsaConfig(**{**model.config.to_dict(), "attn_implementation": name}))
    from_config.load_state_dict(model.state_dict())
    for candidate in (model, loaded, from_config):
        assert candidate.config._attn_implementation == name
        seen.clear()
        if expected_op == "triton":  # on this CPU: clearly refused (no silent fallback)
            with pytest.raises(RuntimeError, match="CUDA GPU"):
                candidate(ids())
        else:
            expected = candidate.eval()(ids()).logits
            torch.testing.assert_close(expected, model.eval()(ids()).logits, atol=1e-5, rtol=1e-5)
        assert seen and set(seen) == {expected_op}


@pytest.mark.parametrize("name", ["sdpa", "flash_attention_2", "flex_attention", "palimpsa_chunked"])
def test_attn_implementation_refuses_names_without_a_memory_op(name):
    with pytest.raises(ValueError, match="palimpsa_chunk"):
        tiny_model().set_attn_implementation(name)
    with pytest.raises((ValueError, StrictDataclassError), match="palimpsa_reference"):
        PalimpsaForCausalLM(PalimpsaConfig(**{**tiny_model().config.to_dict(), "attn_implementation": name}))


def test_hidden_act_is_the_mlp_activation():
    torch.manual_seed(0)
    silu = tiny_model()
    gelu = PalimpsaForCausalLM(PalimpsaConfig(**{**silu.config.to_dict(), "hidden_act": "gelu"}))
    gelu.load_state_dict(silu.state_dict())
    x = ids()
    with torch.no_grad():
        assert not torch.allclose(silu(x).logits, gelu(x).logits)
        mlp = silu.model.layers[0].mlp
        h = torch.randn(2, 3, silu.config.hidden_size)
        torch.testing.assert_close(mlp(h), mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h)))
    with pytest.raises((ValueError, StrictDataclassError), match="hidden_act"):
        PalimpsaConfig(hidden_act="swishy")


def test_auto_classes_and_save_load_round_trip(tmp_path):
    model = tiny_model(gates="paper", prior_precision=2.0)
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PalimpsaConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PalimpsaForCausalLM
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied
    torch.testing.assert_close(loaded.model.layers[1].mixer.log_prior_precision, torch.full((2,), 2.0).log())
    assert type(AutoModel.from_config(model.config)) is PalimpsaModel
    assert amformers.PalimpsaConfig is PalimpsaConfig


def test_cache_object_api():
    cache = PalimpsaCache(tiny_config())
    assert len(cache) == 2 and cache.get_seq_length() == 0 and not cache.has_previous_state(0)
    model = tiny_model()
    with torch.no_grad():
        model(ids(3, 4), cache=cache, use_cache=True)
    assert cache.has_previous_state(0) and cache.get_seq_length() == 4 and not cache.is_croppable
    assert all(cache.is_linear) and cache.nbytes() > 0
    mu = cache.get_recurrent_state(0)[:, 0].clone()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    torch.testing.assert_close(cache.get_recurrent_state(0)[:, 0], mu[[2, 0, 0]])
    cache.reset()
    assert cache.get_seq_length() == 0 and not cache.has_previous_state(0)
