"""Our Triton kernels against their references: in Triton's interpreter on CPU, or compiled on a CUDA GPU.

Not collected by the main test run (the name does not start with `test_`). Two ways to run it:
* interpreter (CPU, fp32, tiny shapes): tests/test_triton_kernels.py runs this file with pytest in a subprocess whose
  environment has TRITON_INTERPRET=1. The variable must be set before the kernels are first decorated
  (transformers imports triton early in any process), so a fresh process is the reliable way. By hand:
  `TRITON_INTERPRET=1 pytest tests/triton_interpreter_cases.py`.
* native (a CUDA GPU, TRITON_INTERPRET unset): `pytest tests/triton_interpreter_cases.py` (bench/gpu_check.sh does).
  Every tensor and model is made on the GPU (torch's default device), fp32, with TF32 off in PyTorch's matmuls and
  the kernels' fp32 products in IEEE precision, so the same fp32 tolerance holds. The bf16 cases run only here.
Without either (no interpreter, no CUDA) the file refuses to run.

Every fp32 comparison is a relative error ||fast - reference|| / ||reference|| <= 1e-4, outputs, final states and
the gradient of every input. The bf16 cases compare kernels fed bf16 inputs against the fp32 reference on the same
(rounded) inputs: relative error <= 2e-2 for outputs and <= 5e-2 for gradients (bf16 keeps 8 significant bits,
~4e-3 per rounding; the kernels round p, outputs and gradients to bf16 on top of fp32 accumulation).
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402
import torch  # noqa: E402

if not INTERPRET and not torch.cuda.is_available():
    raise RuntimeError(
        "Run this file with TRITON_INTERPRET=1 in the environment, or on a machine with a CUDA GPU (see its docstring)."
    )
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET:
    torch.set_default_device(DEVICE)  # every tensor and model the cases make lives on the GPU
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references stay fp32
    torch.backends.cudnn.allow_tf32 = False

from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402

import amformers  # noqa: E402
from amformers import AttnStreamConfig, AttnStreamForCausalLM  # noqa: E402
from amformers.modeling.kernels import attn_stream_triton, palimpsa_triton  # noqa: E402
from amformers.modeling.kernels.attn_stream import attn_stream_attention_reference  # noqa: E402
from amformers.modeling.kernels.attn_stream_triton import attn_stream_flash_attention  # noqa: E402
from amformers.modeling.kernels.palimpsa import palimpsa_attention  # noqa: E402
from amformers.modeling.kernels.palimpsa_triton import palimpsa_recurrent_step_triton  # noqa: E402
from amformers.modeling.kernels.triton_switch import amformers_triton_attention  # noqa: E402

TOLERANCE = 1e-4


BF16_OUTPUT_TOLERANCE, BF16_GRAD_TOLERANCE = 2e-2, 5e-2


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the cases' device (a CPU generator cannot feed CUDA tensors)."""
    return torch.Generator(device=DEVICE).manual_seed(seed)


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    fast, reference = fast.double(), reference.double()
    return ((fast - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def assert_close(name: str, fast: torch.Tensor, reference: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert fast.shape == reference.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    error = relative_error(fast, reference)
    assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance}"


def test_kernels_really_run_where_asked():
    """Interpreter mode runs the interpreter on CPU tensors; native mode compiles the kernels for the GPU."""
    assert attn_stream_triton.INTERPRETED == palimpsa_triton.INTERPRETED == INTERPRET
    assert torch.randn(1).device.type == ("cpu" if INTERPRET else "cuda")


# --------------------------------------------------------------------------------------------------------------
# AttnStream flash attention


def left_padding_mask(batch: int, q_len: int, kv_len: int, pads: list[int], causal: bool = True) -> torch.Tensor:
    """What transformers' sdpa_mask builds: bool [B, 1, q, kv], left padding (and causal, bottom-right aligned)."""
    keys = torch.arange(kv_len)[None, :] >= torch.tensor(pads)[:, None]  # [B, kv]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        allowed = allowed.tril(kv_len - q_len)
    return (keys[:, None, None, :] & allowed).expand(batch, 1, q_len, kv_len)


ATTENTION_CASES = {
    # name: (B, Hq, Hkv, Tq, Tk, D, causal, padded, stream, learned weights)
    "gqa_causal_T37": (2, 4, 2, 37, 37, 16, True, False, None, False),
    "values_mix_padding_gqa_D24": (2, 4, 2, 37, 37, 24, True, True, "values", True),
    "keys_mix_padding_D32": (2, 2, 2, 29, 29, 32, True, True, "keys", True),
    "queries_mix_mqa": (2, 4, 1, 21, 21, 16, True, False, "queries", True),
    "fixed_values_mix_q_shorter_than_kv": (1, 2, 1, 5, 40, 16, True, False, "values", False),
    "bidirectional_padding_D128": (1, 2, 2, 20, 20, 128, False, True, None, False),
}


def make_attention_inputs(B, Hq, Hkv, Tq, Tk, D, causal, padded, stream, learned):
    # transformers hands over transposed views of [B, T, H, D] projections: keep that layout.
    q = torch.randn(B, Tq, Hq, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, Tk, Hkv, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, Tk, Hkv, D).transpose(1, 2).requires_grad_()
    kwargs = dict(scale=D**-0.5, causal=causal)
    if stream is not None:
        own = {"queries": q, "keys": k, "values": v}[stream]
        heads = own.shape[1]
        source = torch.randn(B, own.shape[2], heads, D).transpose(1, 2).requires_grad_()
        weights = (torch.randn(2, heads) * 0.5 + 1.0).requires_grad_() if learned else (0.5, 0.5)
        kwargs.update(stream=stream, source_projection=source, stream_weights=weights)
    mask = left_padding_mask(B, Tq, Tk, [0, 7][:B], causal) if padded else None
    return q, k, v, mask, kwargs


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_flash_attention_equals_reference(case):
    q, k, v, mask, kwargs = make_attention_inputs(*ATTENTION_CASES[case])
    mix_tensors = (kwargs.get("source_projection"), kwargs.get("stream_weights"))
    inputs = [q, k, v] + [x for x in mix_tensors if torch.is_tensor(x)]
    out = attn_stream_flash_attention(q, k, v, mask, **kwargs)
    reference = attn_stream_attention_reference(q, k, v, mask, **kwargs)
    assert_close("output", out, reference)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    reference_grads = torch.autograd.grad(reference, inputs, grad_out)
    for name, fast, slow in zip(["q", "k", "v", "source", "weights"], grads, reference_grads):
        assert_close(f"d{name}", fast, slow)


@pytest.mark.parametrize("case", ["values_mix_padding_gqa_D24", "keys_mix_padding_D32", "gqa_causal_T37"])
def test_flash_attention_equals_transformers_eager(case):
    """Against transformers' own eager attention on the explicitly mixed tensors, with its additive mask."""
    B, Hq, Hkv, Tq, Tk, D, causal, padded, stream, learned = ATTENTION_CASES[case]
    q, k, v, mask, kwargs = make_attention_inputs(B, Hq, Hkv, Tq, Tk, D, causal, padded, stream, learned)
    out = attn_stream_flash_attention(q, k, v, mask, **kwargs)
    if stream is not None:
        weights = kwargs["stream_weights"][:, None, :, None, None]
        mixed = weights[0] * {"queries": q, "keys": k, "values": v}[stream] + weights[1] * kwargs["source_projection"]
        q, k, v = (mixed if stream == s else x for s, x in (("queries", q), ("keys", k), ("values", v)))
    if mask is None:
        mask = left_padding_mask(B, Tq, Tk, [0] * B)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.num_key_value_groups = Hq // Hkv
    eager, _ = eager_attention_forward(module.eval(), q, k, v, additive, scaling=D**-0.5)
    valid = mask[:, 0].any(-1)  # rows with something to attend to (eager averages all values elsewhere)
    assert_close("output", out[valid], eager[valid])


def test_flash_attention_refuses_bad_inputs():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="boolean attention mask"):
        attn_stream_flash_attention(q, q, q, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="head_dim"):
        attn_stream_flash_attention(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="multiple"):
        attn_stream_flash_attention(torch.randn(1, 3, 8, 16), q, q)
    with pytest.raises(ValueError, match="stream source"):
        attn_stream_flash_attention(q, q, q, stream="values", source_projection=torch.randn(1, 2, 7, 16))


def test_attention_function_refuses_what_the_kernel_does_not_do():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="dropout"):
        amformers_triton_attention(module, q, q, q, None, scaling=0.25, dropout=0.1)
    with pytest.raises(ValueError, match="softcap"):
        amformers_triton_attention(module, q, q, q, None, scaling=0.25, softcap=30.0)


# --------------------------------------------------------------------------------------------------------------
# AttnStream model: attn_implementation="amformers_triton" against the PyTorch paths


def tiny_attn_stream(**overrides) -> AttnStreamForCausalLM:
    fields = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=0,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    model = AttnStreamForCausalLM(AttnStreamConfig(**fields))
    for module in model.modules():  # learned weights away from their init, so a wrong mix would show
        if getattr(module, "stream_weights", None) is not None:
            with torch.no_grad():
                module.stream_weights.add_(torch.randn_like(module.stream_weights) * 0.3)
    return model


def forward_backward(model, implementation, input_ids, attention_mask, use_cache):
    model.set_attn_implementation(implementation)
    model.zero_grad()
    # No loss on a token whose predicting position is padding: an all-masked query row is 0 in the kernel and sdpa
    # but the mean of the values in eager, and no loss should depend on it.
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(attention_mask[:, :-1] == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def padded_batch(length=17):
    input_ids = torch.randint(3, 128, (2, length), generator=generator(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :6] = 0  # left padding: rows and keys the kernel must mask
    return input_ids, attention_mask


def assert_same_results(results, reference, valid):
    (logits, grads), (ref_logits, ref_grads) = results, reference
    assert_close("logits", logits[valid], ref_logits[valid])
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(f"grad {name}", grads[name], ref_grads[name])


@pytest.fixture
def fused_streams(monkeypatch):
    """Records the stream the kernel mixed itself on each call (None: got mixed tensors or no stream)."""
    seen = []
    kernel = attn_stream_triton.attn_stream_flash_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("stream"))
        return kernel(*args, **kwargs)

    monkeypatch.setattr(attn_stream_triton, "attn_stream_flash_attention", spy)
    return seen


@pytest.mark.parametrize(
    "stream, source, weights",
    [("values", "previous", "learned"), ("keys", "first", "fixed"), ("queries", "previous", "learned")],
)
def test_model_forward_backward_equals_default_path(stream, source, weights, fused_streams):
    """Training-style call (no cache): equal to the default (sdpa). A values stream is mixed by the kernel in its
    loads from the parts the layer passes as keywords; key and query streams arrive mixed (the mix precedes RoPE)."""
    model = tiny_attn_stream(attention_stream=stream, stream_source=source, stream_weighting=weights)
    assert model.config._attn_implementation == "sdpa"  # the default stays the PyTorch path
    input_ids, attention_mask = padded_batch()
    reference = forward_backward(model, "sdpa", input_ids, attention_mask, use_cache=False)
    results = forward_backward(model, "amformers_triton", input_ids, attention_mask, use_cache=False)
    fused = stream if stream == "values" else None
    assert fused_streams == [None, fused, fused]  # layer 0 has no mix; layers 1, 2 fuse a values stream
    assert_same_results(results, reference, attention_mask.bool())


def test_model_greedy_generation_equals_sdpa(fused_streams):
    """With a cache the cache holds the mixed values: the prefill (no cached keys before it) fuses the values mix,
    each decoding step reads the mixed cache. Prefill and every step with the kernel reproduce sdpa's tokens."""
    model = tiny_attn_stream(attention_stream="values", stream_weighting="learned").eval()
    input_ids = torch.randint(3, 128, (2, 9), generator=generator(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    settings = dict(attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids, **settings)
    model.set_attn_implementation("amformers_triton")
    assert torch.equal(model.generate(input_ids, **settings), expected)
    assert fused_streams == [None, "values", "values"] + [None] * 3 * 3  # prefill, then 3 steps of 3 layers


def test_model_from_pretrained_with_triton_attention(tmp_path):
    tiny_attn_stream().save_pretrained(tmp_path)
    model = AttnStreamForCausalLM.from_pretrained(
        tmp_path, attn_implementation="amformers_triton", dtype=torch.float32
    ).to(DEVICE)
    assert model.config._attn_implementation == "amformers_triton"
    input_ids = torch.randint(3, 128, (1, 7))
    expected = AttnStreamForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(DEVICE)(input_ids).logits
    assert_close("logits", model(input_ids).logits, expected)


# --------------------------------------------------------------------------------------------------------------
# Palimpsa chunked scan and recurrent step


PALIMPSA_CASES = {
    # name: (B, T, H, K, V, initial state, uncertainty, prior)
    "T13_V12_K8_state_uncertainty": (1, 13, 2, 8, 12, True, True, 1.0),
    "T16_V4_K12_per_head_prior": (2, 16, 2, 12, 4, False, False, "per-head"),
    "T5_scalar_tensor_prior_state": (1, 5, 1, 8, 6, True, True, "tensor"),
}


def make_palimpsa_inputs(B, T, H, K, V, with_state, prior, seed=0):
    g = generator(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, V, generator=g) * 2
    log_alpha = torch.log(torch.rand(B, T, H, generator=g) * 0.9 + 0.05)  # strong and weak forgetting
    state = None
    if with_state:
        state = (torch.randn(B, H, V, K, generator=g), 0.5 + 2 * torch.rand(B, H, V, K, generator=g))
    if prior == "per-head":
        prior = torch.linspace(0.5, 2.0, H)
    elif prior == "tensor":
        prior = torch.tensor(1.5)
    return q, k, v, beta, log_alpha, state, prior


@pytest.mark.parametrize("case", list(PALIMPSA_CASES))
def test_palimpsa_chunk_scan_equals_reference(case):
    B, T, H, K, V, with_state, uncertainty, prior = PALIMPSA_CASES[case]
    q, k, v, beta, log_alpha, state, prior = make_palimpsa_inputs(B, T, H, K, V, with_state, prior)
    inputs = [q, k, v, beta, log_alpha] + ([prior] if torch.is_tensor(prior) else []) + list(state or [])
    for x in inputs:
        x.requires_grad_()
    results = {}
    for impl in ("triton", "reference"):
        out = palimpsa_attention(
            q, k, v, beta, log_alpha, prior_precision=prior, initial_state=state, output_final_state=True,
            output_uncertainty=uncertainty, impl=impl,
        )  # fmt: skip
        results[impl] = [out[0], *out[1]] + ([out[2]] if uncertainty else [])
    names = ["o", "final mu", "final I", "var"]
    for name, fast, slow in zip(names, results["triton"], results["reference"]):
        assert_close(name, fast, slow)
    upstream = [torch.randn_like(x) for x in results["reference"]]  # every output feeds the loss
    grads = torch.autograd.grad(results["triton"], inputs, upstream)
    reference_grads = torch.autograd.grad(results["reference"], inputs, upstream)
    names = ["q", "k", "v", "beta", "log_alpha"] + (["prior"] if torch.is_tensor(prior) else []) + ["mu0", "I0"]
    for name, fast, slow in zip(names, grads, reference_grads):
        assert_close(f"d{name}", fast, slow)


def test_palimpsa_triton_without_beta_and_only_the_output():
    q, k, v, _, log_alpha, _, _ = make_palimpsa_inputs(1, 11, 2, 8, 4, False, 1.0)
    q.requires_grad_()
    fast, _ = palimpsa_attention(q, k, v, None, log_alpha, impl="triton")
    slow, _ = palimpsa_attention(q, k, v, None, log_alpha, impl="reference")
    assert_close("o", fast, slow)
    assert_close("dq", torch.autograd.grad(fast.sum(), q)[0], torch.autograd.grad(slow.sum(), q)[0])


@pytest.mark.parametrize("T", [1, 7])
def test_palimpsa_recurrent_step_updates_the_state_in_place(T):
    q, k, v, beta, log_alpha, state, _ = make_palimpsa_inputs(2, T, 2, 12, 6, True, 1.0, seed=T)
    reference_o, (reference_mu, reference_I), reference_var = palimpsa_attention(
        q, k, v, beta, log_alpha, initial_state=state, output_final_state=True, output_uncertainty=True,
        impl="reference",
    )  # fmt: skip
    mu, precision = (x.clone() for x in state)
    pointers = (mu.data_ptr(), precision.data_ptr())
    o, var = palimpsa_recurrent_step_triton(q, k, v, beta, log_alpha, (mu, precision), 1.0, None, True)
    assert (mu.data_ptr(), precision.data_ptr()) == pointers
    for name, fast, slow in [("o", o, reference_o), ("var", var, reference_var), ("mu", mu, reference_mu),
                             ("I", precision, reference_I)]:  # fmt: skip
        assert_close(name, fast, slow)


@torch.no_grad()
def test_palimpsa_triton_without_grad_takes_the_recurrent_kernel_for_short_inputs(monkeypatch):
    q, k, v, beta, log_alpha, state, prior = make_palimpsa_inputs(2, 9, 2, 8, 12, True, "per-head", seed=4)
    calls = []
    step = palimpsa_triton.palimpsa_recurrent_step_triton
    monkeypatch.setattr(palimpsa_triton, "palimpsa_recurrent_step_triton", lambda *a: calls.append(1) or step(*a))
    settings = dict(prior_precision=prior, initial_state=state, output_final_state=True, output_uncertainty=True)
    fast = palimpsa_attention(q, k, v, beta, log_alpha, impl="triton", **settings)
    slow = palimpsa_attention(q, k, v, beta, log_alpha, impl="reference", **settings)
    assert calls == [1]
    for name, a, b in zip(["o", "mu", "I", "var"], [fast[0], *fast[1], fast[2]], [slow[0], *slow[1], slow[2]]):
        assert_close(name, a, b)
    assert fast[1][0].data_ptr() != state[0].data_ptr()  # the caller's state is not overwritten


def test_palimpsa_prefill_then_decode_equals_one_pass():
    q, k, v, beta, log_alpha, _, prior = make_palimpsa_inputs(1, 19, 2, 8, 8, False, "per-head", seed=3)
    whole, _ = palimpsa_attention(q, k, v, beta, log_alpha, prior_precision=prior, impl="reference")
    prefix, (mu, precision) = palimpsa_attention(
        q[:, :15], k[:, :15], v[:, :15], beta[:, :15], log_alpha[:, :15], prior_precision=prior,
        output_final_state=True, impl="triton",
    )  # fmt: skip
    mu, precision = mu.contiguous(), precision.contiguous()
    steps = [
        palimpsa_recurrent_step_triton(
            q[:, t : t + 1],
            k[:, t : t + 1],
            v[:, t : t + 1],
            beta[:, t : t + 1],
            log_alpha[:, t : t + 1],
            (mu, precision),
            prior,
        )  # fmt: skip
        for t in range(15, 19)
    ]
    assert_close("o", torch.cat([prefix, *steps], dim=1), whole)


def test_palimpsa_step_refuses_long_inputs_and_foreign_state():
    q, k, v, beta, log_alpha, state, _ = make_palimpsa_inputs(1, 65, 1, 4, 4, True, 1.0)
    with pytest.raises(ValueError, match="at most 64 tokens"):
        palimpsa_recurrent_step_triton(q, k, v, beta, log_alpha, state)
    with pytest.raises(ValueError, match="contiguous fp32"):
        palimpsa_recurrent_step_triton(
            q[:, :2], k[:, :2], v[:, :2], beta[:, :2], log_alpha[:, :2], (state[0].double(), state[1])
        )


def tiny_palimpsa(**overrides):
    if not hasattr(amformers, "PalimpsaConfig"):
        pytest.skip("amformers has no PalimpsaConfig yet: the Palimpsa model is not in the package.")
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=1,
        head_dim=8,
        expand_v=1.5,  # V = 12 != K = 8
        intermediate_size=64,
        pad_token_id=0,
    )
    fields.update(overrides)
    torch.manual_seed(0)
    return amformers.PalimpsaForCausalLM(amformers.PalimpsaConfig(**fields))


def test_palimpsa_model_forward_backward_equals_default_path(monkeypatch):
    model = tiny_palimpsa()
    default = model.config._attn_implementation  # the PyTorch path
    input_ids, attention_mask = padded_batch(length=13)
    reference = forward_backward(model, default, input_ids, attention_mask, use_cache=False)
    calls = []
    kernel = palimpsa_triton.palimpsa_attention_triton
    spy = lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(palimpsa_triton, "palimpsa_attention_triton", spy)
    results = forward_backward(model, "amformers_triton", input_ids, attention_mask, use_cache=False)
    assert len(calls) == model.config.num_hidden_layers  # every layer's memory ran the Triton kernel
    assert_same_results(results, reference, attention_mask.bool())


def test_palimpsa_model_greedy_generation_equals_default_path():
    model = tiny_palimpsa().eval()
    input_ids = torch.randint(3, 128, (2, 6), generator=generator(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    settings = dict(attention_mask=attention_mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = model.generate(input_ids, **settings)
    model.set_attn_implementation("amformers_triton")
    assert torch.equal(model.generate(input_ids, **settings), expected)


# --------------------------------------------------------------------------------------------------------------
# bf16 inputs (native CUDA only): the kernels against the fp32 reference on the same rounded inputs

native_only = pytest.mark.skipif(INTERPRET, reason="bf16 kernels are checked compiled on a GPU (bench/gpu_check.sh)")


def bf16_leaves(tensors):
    """bf16 copies (the inputs a bf16 model hands the kernel) and fp32 copies of those rounded values."""
    half = [x.detach().bfloat16().requires_grad_() for x in tensors]
    return half, [x.detach().float().requires_grad_() for x in half]


@native_only
@pytest.mark.parametrize("case", ["gqa_causal_T37", "values_mix_padding_gqa_D24", "bidirectional_padding_D128"])
def test_flash_attention_bf16_against_fp32_reference(case):
    q, k, v, mask, kwargs = make_attention_inputs(*ATTENTION_CASES[case])
    names = ["q", "k", "v"] + (["source", "weights"] if "source_projection" in kwargs else [])
    tensors = [q, k, v] + [kwargs[n] for n in ("source_projection", "stream_weights") if n in kwargs]
    tensors = [t for t in tensors if torch.is_tensor(t)]
    half, full = bf16_leaves(tensors)

    def call(inputs, fn):
        extra = dict(kwargs)
        if "source_projection" in kwargs:
            extra["source_projection"] = inputs[3]
            if torch.is_tensor(kwargs["stream_weights"]):
                extra["stream_weights"] = inputs[4]
        return fn(inputs[0], inputs[1], inputs[2], mask, **extra)

    out = call(half, attn_stream_flash_attention)
    reference = call(full, attn_stream_attention_reference)
    assert out.dtype == torch.bfloat16
    assert_close("output", out.float(), reference, BF16_OUTPUT_TOLERANCE)
    grad_out = torch.randn(reference.shape)
    grads = torch.autograd.grad(out, half, grad_out.bfloat16())
    reference_grads = torch.autograd.grad(reference, full, grad_out)
    for name, fast, slow in zip(names, grads, reference_grads):
        assert_close(f"d{name}", fast.float(), slow, BF16_GRAD_TOLERANCE)


@native_only
@pytest.mark.parametrize("shape", [(2, 16, 2, 12, 4), (2, 200, 4, 16, 32)])  # the second: MQAR heads, many chunks
def test_palimpsa_bf16_against_fp32_reference(shape):
    q, k, v, beta, log_alpha, _, _ = make_palimpsa_inputs(*shape, False, 1.0, seed=5)
    half, full = bf16_leaves([q, k, v, beta, log_alpha])
    out, _ = palimpsa_attention(*half, impl="triton")
    reference, _ = palimpsa_attention(*full, impl="reference")
    assert_close("o", out.float(), reference, BF16_OUTPUT_TOLERANCE)
    upstream = torch.randn(reference.shape)
    grads = torch.autograd.grad(out, half, upstream.bfloat16())
    reference_grads = torch.autograd.grad(reference, full, upstream)
    for name, fast, slow in zip(["q", "k", "v", "beta", "log_alpha"], grads, reference_grads):
        assert_close(f"d{name}", fast.float(), slow, BF16_GRAD_TOLERANCE)
