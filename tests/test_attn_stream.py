"""AttnStream: the stream semantics, Llama equivalence, and the behaviour users rely on in transformers."""

import math

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import amformers
from amformers import AttnStreamConfig, AttnStreamForCausalLM, AttnStreamModel
from amformers.convert import llama_to_attn_stream
from amformers.modeling.compat import CACHE_NAME

STREAM_VARIANTS = [
    (stream, source, weights)
    for stream in ("values", "keys", "queries")
    for source in ("previous", "first")
    for weights in ("fixed", "learned")
]


def tiny_config(**overrides) -> AttnStreamConfig:
    fields = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.2,  # peaked logits, so greedy decoding has no near-ties
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    fields.update(overrides)
    return AttnStreamConfig(**fields)


def tiny_model(**overrides) -> AttnStreamForCausalLM:
    torch.manual_seed(0)
    model = AttnStreamForCausalLM(tiny_config(**overrides)).eval()
    for module in model.modules():  # learned weights away from their init, so a wrong mix shows
        if getattr(module, "stream_weights", None) is not None:
            with torch.no_grad():
                module.stream_weights.add_(torch.randn_like(module.stream_weights) * 0.3)
    return model


def ids(batch=2, length=11, vocab=320, seed=1):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------------------
# The paper's equations, written out plainly: the oracle the model is held to.


def reference_logits(model: AttnStreamForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    cfg, body = model.config, model.model
    B, T = input_ids.shape
    Hq, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = body.embed_tokens.weight[input_ids]
    pos = torch.arange(T, dtype=torch.float32)
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    angles = torch.cat([pos[:, None] * inv_freq] * 2, dim=-1)  # [T, D]

    def rope(x):  # x: [B, T, H, D]
        half = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1)
        return x * angles.cos()[None, :, None] + half * angles.sin()[None, :, None]

    def rms(x, norm):
        return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    first_raw, prev_raw = None, None
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer_idx, layer in enumerate(body.layers):
        attn = layer.self_attn
        x = rms(h, layer.input_layernorm)
        raw = {
            "queries": (x @ attn.q_proj.weight.T).view(B, T, Hq, D),
            "keys": (x @ attn.k_proj.weight.T).view(B, T, Hkv, D),
            "values": (x @ attn.v_proj.weight.T).view(B, T, Hkv, D),
        }
        mixed = dict(raw)
        if cfg.attention_stream != "none":
            own = raw[cfg.attention_stream]
            if layer_idx > 0:
                source = prev_raw if cfg.stream_source == "previous" else first_raw
                if cfg.stream_weights == "learned":
                    w_own = attn.stream_weights[0][None, None, :, None]
                    w_src = attn.stream_weights[1][None, None, :, None]
                else:
                    w_own, w_src = (1.0, 1.0) if cfg.stream_source == "previous" else (0.5, 0.5)
                mixed[cfg.attention_stream] = w_own * own + w_src * source
            else:
                first_raw = own
            prev_raw = own
        q = rope(mixed["queries"]).transpose(1, 2)
        k = rope(mixed["keys"]).repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
        v = mixed["values"].repeat_interleave(Hq // Hkv, dim=2).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(B, T, Hq * D)
        h = h + out @ attn.o_proj.weight.T
        x = rms(h, layer.post_attention_layernorm)
        mlp = layer.mlp
        h = h + (F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return rms(h, body.norm) @ model.lm_head.weight.T


@pytest.mark.parametrize("stream,source,weights", STREAM_VARIANTS + [("none", "previous", "fixed")])
def test_forward_matches_paper_equations(stream, source, weights):
    model = tiny_model(attention_stream=stream, stream_source=source, stream_weighting=weights)
    x = ids()
    with torch.no_grad():
        expected = reference_logits(model, x)
        for impl in ("eager", "sdpa"):
            model.set_attn_implementation(impl)
            torch.testing.assert_close(model(x).logits, expected, atol=1e-4, rtol=1e-4)


def test_stream_changes_the_model_and_layer_zero_has_no_mix():
    base = tiny_model(attention_stream="none")
    streamed = AttnStreamForCausalLM(tiny_config(attention_stream="values")).eval()
    streamed.load_state_dict(base.state_dict())
    x = ids()
    assert not torch.allclose(base(x).logits, streamed(x).logits, atol=1e-3)
    assert streamed.model.layers[0].self_attn.mixes_stream is False
    assert all(layer.self_attn.mixes_stream for layer in streamed.model.layers[1:])


def test_learned_weights_init_and_gradients():
    model = AttnStreamForCausalLM(tiny_config(stream_weighting="learned", stream_source="first"))
    w = model.model.layers[1].self_attn.stream_weights
    assert w.shape == (2, 2)  # (own, source) x key/value heads
    torch.testing.assert_close(w, torch.full_like(w, 0.5))
    identity = AttnStreamForCausalLM(
        tiny_config(stream_weighting="learned", stream_init="identity", attention_stream="queries")
    )
    wq = identity.model.layers[2].self_attn.stream_weights
    assert wq.shape == (2, 4)
    torch.testing.assert_close(wq, torch.tensor([[1.0] * 4, [0.0] * 4]))
    x = ids()
    model(x, labels=x).loss.backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# Llama equivalence and conversion


def tiny_llama(tie=True) -> LlamaForCausalLM:
    torch.manual_seed(3)
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize(
    "settings",
    [
        dict(attention_stream="none"),
        dict(attention_stream="values", stream_weighting="learned", stream_init="identity"),
        dict(attention_stream="keys", stream_weighting="learned", stream_init="identity", stream_source="first"),
        dict(attention_stream="queries", stream_weighting="learned", stream_init="identity"),
    ],
)
@pytest.mark.parametrize("tie", [True, False])
def test_llama_conversion_is_exact(settings, tie):
    llama = tiny_llama(tie)
    model = llama_to_attn_stream(llama, **settings).eval()
    x = ids()
    with torch.no_grad():
        diff = (model(x).logits - llama(x).logits).abs().max()
    assert diff <= 1e-5
    assert model.config.tie_word_embeddings == tie


def test_llama_conversion_from_path_with_fixed_streams(tmp_path):
    llama = tiny_llama()
    llama.save_pretrained(tmp_path / "llama")
    model = llama_to_attn_stream(tmp_path / "llama", attention_stream="values")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference_logits(model, x), atol=1e-4, rtol=1e-4)
        assert (model(x).logits - llama(x).logits).abs().max() > 1e-3  # the paper's model, not Llama's
    with pytest.raises(ValueError, match="Unknown stream settings"):
        llama_to_attn_stream(llama, attention_streams="values")


# --------------------------------------------------------------------------------------------------------------
# Configuration and input errors


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(attention_stream="value"), "attention_stream"),
        (dict(stream_source="last"), "stream_source"),
        (dict(stream_weighting="gated"), "stream_weighting"),
        (dict(stream_init="zeros", stream_weighting="learned"), "stream_init"),
        (dict(stream_init="identity"), "identity"),
        (dict(hidden_size=66), "divisible by `num_attention_heads`"),
        (dict(num_key_value_heads=3), "multiple of `num_key_value_heads`"),
    ],
)
def test_invalid_config_raises_clear_error(overrides, message):
    # transformers' @strict configs wrap validator errors in StrictDataclassError (as for LlamaConfig)
    with pytest.raises((ValueError, StrictDataclassError), match=message):
        tiny_config(**overrides)


def test_invalid_inputs_raise_clear_errors():
    model = tiny_model()
    # The token-id range is a device-side assert (no host sync): a RuntimeError carrying our message.
    with pytest.raises(RuntimeError, match=r"Token ids must lie in \[0, vocab_size=320\)"):
        model(torch.tensor([[5, 320]]))
    with pytest.raises(RuntimeError, match="Token ids"):
        model(torch.tensor([[-1, 4]]))
    with pytest.raises(ValueError, match="no tokens"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size 0"):
        model(torch.zeros(0, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[batch, seq_len\]"):
        model(torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids(2, 5), attention_mask=torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(ids(2, 5), labels=ids(2, 4))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 5, 63))
    with pytest.raises(ValueError, match="exactly one"):
        model()


# --------------------------------------------------------------------------------------------------------------
# Attention implementations, cache and generation


def test_output_attentions_with_eager():
    model = tiny_model()
    model.set_attn_implementation("eager")
    out = model(ids(2, 7), output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 3 and out.attentions[0].shape == (2, 4, 7, 7)
    torch.testing.assert_close(out.attentions[1].sum(-1), torch.ones(2, 4, 7))
    assert len(out.hidden_states) == 4


@pytest.mark.parametrize("stream,source,weights", STREAM_VARIANTS)
def test_cached_decoding_equals_full_forward(stream, source, weights):
    model = tiny_model(attention_stream=stream, stream_source=source, stream_weighting=weights)
    x = ids(2, 12)
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :5], use_cache=True)
        steps = [out.logits]
        cache = getattr(out, CACHE_NAME)
        for t in range(5, 12):
            out = model(x[:, t : t + 1], cache=cache, use_cache=True)
            cache = getattr(out, CACHE_NAME)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


def test_greedy_generation_with_and_without_cache():
    model = tiny_model(attention_stream="values", stream_weighting="learned")
    prompt = ids(2, 6)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache, without_cache)


def test_left_padded_batch_matches_each_prompt_alone():
    model = tiny_model(attention_stream="keys")
    prompts = [ids(1, 9, seed=5)[0], ids(1, 4, seed=6)[0]]
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 9 - len(prompt) :] = prompt
        mask[row, 9 - len(prompt) :] = 1
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, 9:]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **kwargs)[0, len(prompt) :]
        assert torch.equal(together[row], alone), row


def test_sampling_and_beam_search():
    model = tiny_model()
    prompt = ids(2, 5)
    torch.manual_seed(0)
    sampled = model.generate(prompt, do_sample=True, top_k=20, temperature=0.9, max_new_tokens=7, pad_token_id=0)
    assert sampled.shape == (2, 12) and int(sampled.max()) < 320
    beams = model.generate(prompt, num_beams=3, num_return_sequences=2, max_new_tokens=6, pad_token_id=0)
    assert beams.shape == (4, 11)
    # beam search returns the highest-scoring beam first: its log-probability beats the greedy sequence's or ties
    greedy = model.generate(prompt[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)

    def logprob(seq):
        with torch.no_grad():
            logp = model(seq[None]).logits.log_softmax(-1)[0, 4:-1]
        return logp.gather(-1, seq[5:, None]).sum()

    assert logprob(beams[0]) >= logprob(greedy[0]) - 1e-4


# --------------------------------------------------------------------------------------------------------------
# Saving, loading and the Auto classes


def test_auto_classes_and_save_load_round_trip(tmp_path):
    model = tiny_model(attention_stream="values", stream_weighting="learned", stream_source="first")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), AttnStreamConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is AttnStreamForCausalLM
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=0, rtol=0)
    assert type(AutoModel.from_config(model.config)) is AttnStreamModel
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied


def test_truncated_checkpoint_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(Exception, match=r"(?i)safetensors|header|deserializ|incomplete|invalid"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_package_exports_and_registration():
    assert amformers.AttnStreamConfig is AttnStreamConfig
    assert AutoConfig.for_model("attn_stream").__class__ is AttnStreamConfig
    for name in ("configuration", "modeling", "train", "eval"):
        __import__(f"amformers.{name}")
