"""The fused C++ CPU op: == token-loop reference (values and every gradient), the dispatcher's choice, fallback."""

import shutil
import sys

import pytest
import torch
from test_palimpsa_op import assert_close, check_against_reference, make_inputs

from amformers.modeling.kernels import palimpsa_attention
from amformers.modeling.kernels import palimpsa_cpu as cpu_module
from amformers.modeling.kernels.palimpsa import palimpsa_reference
from amformers.modeling.kernels.palimpsa_cpu import causal_conv_cpu, cpu_kernel_unavailable, palimpsa_cpu

CAN_BUILD = shutil.which("c++") is not None and shutil.which("ninja") is not None


@pytest.fixture(scope="module", autouse=True)
def built_op():
    """Where a C++ compiler and ninja exist the op must build (a failure here is a real failure); elsewhere the
    tests that need it are skipped with the reason."""
    reason = cpu_kernel_unavailable()
    if CAN_BUILD:
        assert reason is None, reason
    elif reason is not None:
        pytest.skip(f"no C++ toolchain here: {reason}")


@pytest.mark.skipif(sys.platform == "darwin", reason="Apple's clang builds the ops without OpenMP (one thread)")
def test_cpu_ops_run_on_torchs_threads():
    """The C++ ops run on torch's intra-op threads. A build without OpenMP ran them on one thread whatever
    torch.get_num_threads() said, which showed only as lost time."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert cpu_module.cpu_kernel_threads() == threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("checkpoint_every", [8, 64])
def test_cpu_op_equals_reference_with_all_gradients(dtype, with_state, checkpoint_every, monkeypatch):
    """T = 37: with checkpoints every 8 tokens the backward recomputes 5 segments (the last one short), with 64 one
    segment. Every output (o, final mu and I, var) feeds the loss; the prior is per head and differentiated."""
    monkeypatch.setattr(cpu_module, "CHECKPOINT_EVERY", checkpoint_every)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    check_against_reference(
        lambda *inputs: palimpsa_cpu(*inputs, True, True), with_state, checkpoint_every, dtype, tolerance
    )


def test_cpu_op_without_optional_outputs_and_with_a_float_prior():
    """The common training call: o only, scalar prior, a custom scale, bf16 inputs (computed in float32)."""
    q, k, v, beta, log_alpha, _ = make_inputs(B=2, T=70, H=2, K=16, V=32, seed=3)
    slow, _ = palimpsa_reference(q, k, v, beta, log_alpha, 0.7, 0.3)
    fast, final = palimpsa_cpu(*(x.float() for x in (q, k, v, beta, log_alpha)), 0.7, 0.3)
    assert final is None
    assert_close("o", fast, slow)
    low, _ = palimpsa_cpu(*(x.bfloat16() for x in (q, k, v, beta, log_alpha)), 0.7, 0.3)
    assert low.dtype == torch.bfloat16
    assert_close("o (bf16 inputs)", low, slow, 2e-2)


def test_auto_runs_the_cpu_op_on_cpu_and_falls_back_when_it_cannot_build(monkeypatch):
    palimpsa_module = sys.modules[palimpsa_attention.__module__]
    calls = []
    for name in ("palimpsa_cpu", "palimpsa_chunk"):
        original = getattr(palimpsa_module, name)
        monkeypatch.setattr(palimpsa_module, name, lambda *a, _n=name, _f=original: calls.append(_n) or _f(*a))
    q, k, v, beta, log_alpha, state = make_inputs(B=1, T=9, H=3, K=4, V=3, with_state=True, dtype=torch.float32)
    fused = palimpsa_attention(q, k, v, beta, log_alpha, initial_state=state, output_final_state=True)
    assert calls == ["palimpsa_cpu"]
    monkeypatch.setitem(cpu_module._loaded, "error", "no compiler (as if)")
    fallback = palimpsa_attention(q, k, v, beta, log_alpha, initial_state=state, output_final_state=True)
    assert calls == ["palimpsa_cpu", "palimpsa_chunk"]
    torch.testing.assert_close(fused[0], fallback[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[1][0], fallback[1][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="C\\+\\+ CPU ops are unavailable: no compiler \\(as if\\).*impl='chunk'"):
        palimpsa_attention(q, k, v, beta, log_alpha, impl="cpu")


def test_cpu_op_refuses_tensors_elsewhere():
    q, k, v, beta, log_alpha, _ = make_inputs(B=1, T=4, H=1, K=4, V=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="runs on the CPU; `q` is on meta"):
        palimpsa_cpu(q.to("meta"), k, v, beta, log_alpha)


def test_missing_source_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    """A copy of the module without its C++ source beside it (a remote-code folder) reports why it cannot build."""
    monkeypatch.setattr(cpu_module, "SOURCE", tmp_path / "palimpsa_cpu.cpp")
    monkeypatch.setattr(cpu_module, "LIBRARY", "amformers_palimpsa_cpu_not_built")
    assert "palimpsa_cpu.cpp is not beside" in cpu_module._build()


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state_at_prior"])
def test_cpu_op_without_metaplasticity_equals_reference(with_state, monkeypatch):
    """beta=None runs the loop's cheap mode (only the numerator moves, I = Ip): the reference with beta = 0 and
    the precision at the prior, all gradients (the prior's too) and the uncertainty readout."""
    monkeypatch.setattr(cpu_module, "CHECKPOINT_EVERY", 8)
    q, k, v, _, log_alpha, state = make_inputs(with_state=True, seed=5)
    prior = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    mu0 = state[0] if with_state else None
    inputs = [q, k, v, log_alpha, prior, *([mu0] if with_state else [])]
    for x in inputs:
        x.requires_grad_(True)

    def initial(prior, mu0=None):
        return (mu0, prior[None, :, None, None].expand_as(mu0)) if with_state else None

    slow = palimpsa_reference(q, k, v, None, log_alpha, prior, None, initial(prior, mu0), True, True)
    fast_inputs = [x.detach().float().requires_grad_(True) for x in inputs]
    fq, fk, fv, flog_alpha, fprior, *fmu0 = fast_inputs
    fast = palimpsa_cpu(fq, fk, fv, None, flog_alpha, fprior, None, initial(fprior, *fmu0), True, True)
    slow_outputs, fast_outputs = [slow[0], *slow[1], slow[2]], [fast[0], *fast[1], fast[2]]
    for name, a, b in zip(["o", "mu_T", "I_T", "var"], fast_outputs, slow_outputs):
        assert_close(name, a, b)
    upstream = [torch.randn_like(x) for x in slow_outputs]
    slow_grads = torch.autograd.grad(slow_outputs, inputs, upstream)
    fast_grads = torch.autograd.grad(fast_outputs, fast_inputs, [u.float() for u in upstream])
    for name, a, b in zip(["q", "k", "v", "log_alpha", "prior", "mu_0"], fast_grads, slow_grads):
        assert_close(f"d{name}", a, b)


def test_auto_on_cpu_runs_the_cpu_op_for_every_mixer_setting(monkeypatch):
    """Metaplastic or not, with or without uncertainty, from the prior or not: prompts run the C++ loop."""
    palimpsa_module = sys.modules[palimpsa_attention.__module__]
    calls = []
    original = palimpsa_module.palimpsa_cpu
    monkeypatch.setattr(palimpsa_module, "palimpsa_cpu", lambda *a: calls.append(a[3] is None) or original(*a))
    q, k, v, beta, log_alpha, state = make_inputs(B=1, T=9, H=3, K=4, V=3, with_state=True, dtype=torch.float32)
    reference = palimpsa_attention(q, k, v, None, log_alpha, initial_state=state, impl="reference")
    moving = palimpsa_attention(q, k, v, None, log_alpha, initial_state=state)  # I_0 != prior: full recurrence
    assert_close("o, beta = 0 from I_0 != prior", moving[0], reference[0])
    palimpsa_attention(q, k, v, None, log_alpha, output_uncertainty=True)
    palimpsa_attention(q, k, v, beta, log_alpha)
    assert calls == [False, True, False]  # beta passed as zeros, beta=None (cheap mode), beta


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_causal_conv_equals_the_shifted_products_with_all_gradients(dtype, with_bias):
    """The C++ short convolution against the model's PyTorch one (sum of shifted products), continuing a window."""
    from amformers.modeling.modeling_palimpsa import causal_conv

    g = torch.Generator().manual_seed(0)
    B, T, C, W = 3, 11, 7, 4
    x, weight = torch.randn(B, T, C, generator=g, dtype=dtype), torch.randn(C, W, generator=g, dtype=dtype)
    window, bias = torch.randn(B, C, W - 1, generator=g, dtype=dtype), torch.randn(C, generator=g, dtype=dtype)
    inputs = [x, weight, window, *([bias] if with_bias else [])]
    for t in inputs:
        t.requires_grad_(True)
    bias_arg = bias if with_bias else None
    slow = causal_conv(x, weight, bias_arg, window, impl="chunk")
    fast = causal_conv_cpu(torch.cat([window.transpose(1, 2), x], dim=1), weight, bias_arg)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-13
    assert fast.dtype == dtype
    assert_close("y", fast, slow, tolerance)
    upstream = torch.randn_like(slow)
    for name, a, b in zip(["x", "weight", "window", "bias"], torch.autograd.grad(fast, inputs, upstream),
                          torch.autograd.grad(slow, inputs, upstream)):  # fmt: skip
        assert_close(f"d{name}", a, b, tolerance)
    # the model's own dispatch: impl="cpu" takes the fused path and gives the same values
    torch.testing.assert_close(causal_conv(x, weight, bias_arg, window, impl="cpu"), fast)


def test_model_compile_decides_the_cpu_ops_before_tracing(monkeypatch):
    """A trace only reads whether the C++ ops exist, so `model.compile()` decides it first (else a model compiled
    before any eager call would trace the PyTorch path for good)."""
    from test_palimpsa_model import tiny_model

    monkeypatch.setattr(cpu_module, "_loaded", {})  # as in a fresh process
    model = tiny_model()
    model.compile(dynamic=False)
    assert cpu_module._loaded == {"error": None}
