"""The Palimpsa op: chunked path == token-loop reference (values and every gradient), special cases, errors."""

import sys

import pytest
import torch

from amformers.modeling.kernels import palimpsa_attention
from amformers.modeling.kernels import palimpsa_chunk as chunk_module
from amformers.modeling.kernels.palimpsa import palimpsa_reference
from amformers.modeling.kernels.palimpsa_chunk import gated_linear_attention_chunk, palimpsa_chunk

TOLERANCE = 1e-5  # fp32 chunked path against the fp64 reference


def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    fast, reference = fast.double(), reference.double()
    return ((fast - reference).norm() / reference.norm().clamp_min(1e-300)).item()


def assert_close(name, fast, reference, tolerance=TOLERANCE):
    assert fast.shape == reference.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(reference.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    error = relative_error(fast, reference)
    assert error <= tolerance, f"{name}: relative error {error:.2e} > {tolerance:.0e}"


def make_inputs(B=2, T=37, H=3, K=8, V=6, with_state=False, seed=0, dtype=torch.float64):
    """Random inputs in the op's domain: unit keys (as the layer gives), beta >= 0, strong and weak forgetting."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=dtype)
    beta = 2 * torch.rand(B, T, H, V, generator=g, dtype=dtype)
    log_alpha = torch.log(0.05 + 0.95 * torch.rand(B, T, H, generator=g, dtype=dtype))
    state = None
    if with_state:
        state = (
            torch.randn(B, H, V, K, generator=g, dtype=dtype),
            0.3 + 3 * torch.rand(B, H, V, K, generator=g, dtype=dtype),
        )
    return q, k, v, beta, log_alpha, state


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("chunk_size", [8, 16])
def test_chunk_equals_reference_with_all_gradients(with_state, chunk_size):
    """T = 37 is not a multiple of the chunk; every output (o, final mu and I, var) feeds the loss."""
    check_chunk_against_reference(with_state, chunk_size)


def test_backward_in_groups_of_chunks_equals_reference(monkeypatch):
    """Long inputs recompute their per-token states in groups of chunks (at most BACKWARD_STATE_BYTES each).
    With a budget of two chunks, T = 37 in chunks of 8 runs as groups of 2, 2 and 1 chunks."""
    chunk_bytes = 2 * 8 * (2 * 3) * 6 * 8 * 4  # 2 states x C x B*H x V x K x fp32
    monkeypatch.setattr(chunk_module, "BACKWARD_STATE_BYTES", 2 * chunk_bytes)
    check_chunk_against_reference(with_state=True, chunk_size=8)


def check_chunk_against_reference(with_state, chunk_size):
    check_against_reference(
        lambda *inputs: palimpsa_chunk(*inputs, True, True, chunk_size=chunk_size), with_state, seed=chunk_size
    )


def check_against_reference(fast_op, with_state, seed, dtype=torch.float32, tolerance=TOLERANCE):
    """`fast_op(q, k, v, beta, log_alpha, prior, scale, initial_state)` (returning o, final state and var) against
    the fp64 token loop: every output and every gradient, the per-head prior and the initial state included."""
    q, k, v, beta, log_alpha, state = make_inputs(with_state=with_state, seed=seed)
    prior = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)  # per-head prior, differentiated too
    inputs = [q, k, v, beta, log_alpha, prior, *(state or ())]
    for x in inputs:
        x.requires_grad_(True)
    slow = palimpsa_reference(q, k, v, beta, log_alpha, prior, None, state, True, True)
    fast_inputs = [x.detach().to(dtype).requires_grad_(True) for x in inputs]
    fq, fk, fv, fbeta, flog_alpha, fprior, *fstate = fast_inputs
    fast = fast_op(fq, fk, fv, fbeta, flog_alpha, fprior, None, tuple(fstate) or None)
    slow_outputs = [slow[0], *slow[1], slow[2]]
    fast_outputs = [fast[0], *fast[1], fast[2]]
    for name, a, b in zip(["o", "mu_T", "I_T", "var"], fast_outputs, slow_outputs):
        assert a.dtype == dtype
        assert_close(name, a, b, tolerance)
    upstream = [torch.randn_like(x) for x in slow_outputs]
    slow_grads = torch.autograd.grad(slow_outputs, inputs, upstream)
    fast_grads = torch.autograd.grad(fast_outputs, fast_inputs, [u.to(dtype) for u in upstream])
    names = ["q", "k", "v", "beta", "log_alpha", "prior", "mu_0", "I_0"]
    for name, a, b in zip(names, fast_grads, slow_grads):
        assert_close(f"d{name}", a, b, tolerance)


def test_chunk_handles_single_chunk_and_one_token_chunks():
    q, k, v, beta, log_alpha, state = make_inputs(B=1, T=5, H=2, K=4, V=3, with_state=True)
    slow = palimpsa_reference(q, k, v, beta, log_alpha, 1.0, None, state, True)
    for chunk_size in (1, 64):
        fast = palimpsa_chunk(q, k, v, beta, log_alpha, 1.0, None, state, True, chunk_size=chunk_size)
        assert_close(f"o (chunk {chunk_size})", fast[0], slow[0], 1e-12)
        assert_close(f"I_T (chunk {chunk_size})", fast[1][1], slow[1][1], 1e-12)


def test_recurrence_by_hand_for_one_token():
    """One token from a given state, against the equations written out."""
    q, k, v, beta, log_alpha, (mu0, I0) = make_inputs(B=1, T=1, H=1, K=3, V=2, with_state=True)
    prior, scale = 0.7, 0.9
    a = log_alpha.exp()[0, 0, 0]
    I1 = a * I0[0, 0] + (1 - a) * prior + beta[0, 0, 0][:, None] * k[0, 0, 0][None, :] ** 2
    M1 = a * I0[0, 0] * mu0[0, 0] + v[0, 0, 0][:, None] * k[0, 0, 0][None, :]
    mu1 = M1 / I1
    o, (mu, precision), var = palimpsa_attention(
        q, k, v, beta, log_alpha, prior_precision=prior, scale=scale, initial_state=(mu0, I0),
        output_final_state=True, output_uncertainty=True,
    )  # fmt: skip
    torch.testing.assert_close(precision[0, 0], I1)
    torch.testing.assert_close(mu[0, 0], mu1)
    torch.testing.assert_close(o[0, 0, 0], scale * mu1 @ q[0, 0, 0])
    torch.testing.assert_close(var[0, 0, 0], (q[0, 0, 0] ** 2 / I1).sum(-1))


def test_beta_zero_is_gated_linear_attention():
    """beta = 0: I stays at the prior and o = scale / Ip * S_t q_t with S_t = a_t S_{t-1} + v_t k_t^T."""
    q, k, v, _, log_alpha, _ = make_inputs(B=1, T=19, H=2, K=4, V=3)
    prior = 2.5
    o, (mu, precision) = palimpsa_reference(q, k, v, torch.zeros_like(v), log_alpha, prior, None, None, True)
    S = torch.zeros(1, 2, 3, 4, dtype=q.dtype)
    expected = []
    for t in range(19):
        S = log_alpha[:, t].exp()[..., None, None] * S + v[:, t, :, :, None] * k[:, t, :, None, :]
        expected.append((S @ q[:, t, :, :, None]).squeeze(-1) * 4**-0.5 / prior)
    torch.testing.assert_close(o, torch.stack(expected, dim=1))
    torch.testing.assert_close(precision, torch.full_like(precision, prior))
    torch.testing.assert_close(mu, S / prior)


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state_at_prior"])
def test_metaplasticity_off_path_equals_reference(with_state):
    """beta=None runs the matmul-only gated-linear-attention path; it equals the reference, gradients included."""
    q, k, v, _, log_alpha, state = make_inputs(T=41, with_state=with_state)
    if state is not None:
        state = (state[0], torch.full_like(state[1], 1.5))  # a non-metaplastic cache holds I == prior
    inputs = [q, k, v, log_alpha, *(state or ())]
    for x in inputs:
        x.requires_grad_(True)
    slow = palimpsa_reference(q, k, v, None, log_alpha, 1.5, None, state, True)
    fast_inputs = [x.detach().float().requires_grad_(True) for x in inputs]
    fq, fk, fv, flog_alpha, *fstate = fast_inputs
    fast = gated_linear_attention_chunk(fq, fk, fv, flog_alpha, 1.5, None, tuple(fstate) or None, True, chunk_size=16)
    for name, a, b in zip(["o", "mu_T", "I_T"], [fast[0], *fast[1]], [slow[0], *slow[1]]):
        assert_close(name, a, b)
    # The path assumes I_0 == prior (the dispatcher only takes it when I_0 is not differentiated): no dI_0 here.
    inputs, fast_inputs = inputs[:5], fast_inputs[:5]
    upstream = [torch.randn_like(slow[0]), torch.randn_like(slow[1][0])]
    slow_grads = torch.autograd.grad([slow[0], slow[1][0]], inputs, upstream)
    fast_grads = torch.autograd.grad([fast[0], fast[1][0]], fast_inputs, [u.float() for u in upstream])
    for name, a, b in zip(["q", "k", "v", "log_alpha", "mu_0"], fast_grads, slow_grads):
        assert_close(f"d{name}", a, b)


def test_dispatcher_picks_the_cheap_path_only_when_it_is_exact(monkeypatch):
    """impl="chunk" with beta=None: gated linear attention (matrix products) only while I stays at the prior."""
    q, k, v, beta, log_alpha, state = make_inputs(B=1, T=9, H=3, K=4, V=3, with_state=True, dtype=torch.float32)
    calls = []
    original = chunk_module.palimpsa_chunk
    monkeypatch.setattr(
        sys.modules[palimpsa_attention.__module__], "palimpsa_chunk", lambda *a: calls.append(1) or original(*a)
    )
    palimpsa_attention(q, k, v, None, log_alpha, impl="chunk")  # beta off, state at the prior: matrix products only
    assert calls == []
    reference = palimpsa_attention(q, k, v, None, log_alpha, initial_state=state, impl="reference")
    out = palimpsa_attention(q, k, v, None, log_alpha, initial_state=state, impl="chunk")  # I_0 != prior: I moves
    assert calls == [1]
    assert_close("o with a moving prior", out[0], reference[0], 1e-5)
    at_prior = (state[0], torch.ones_like(state[1]).requires_grad_(True))
    palimpsa_attention(q, k, v, None, log_alpha, initial_state=at_prior, impl="chunk")  # dI_0 asked for: exact path
    assert calls == [1, 1]


def test_auto_decodes_one_token_with_the_recurrence_and_matches_chunk():
    q, k, v, beta, log_alpha, state = make_inputs(B=2, T=1, H=2, K=4, V=4, with_state=True, dtype=torch.float32)
    auto = palimpsa_attention(q, k, v, beta, log_alpha, initial_state=state, output_final_state=True)
    chunk = palimpsa_attention(q, k, v, beta, log_alpha, initial_state=state, output_final_state=True, impl="chunk")
    torch.testing.assert_close(auto[0], chunk[0])
    torch.testing.assert_close(auto[1][1], chunk[1][1])


def test_empty_sequence_passes_the_state_through():
    q, k, v, beta, log_alpha, state = make_inputs(B=2, T=0, H=2, K=4, V=3, with_state=True, dtype=torch.float32)
    o, (mu, precision), var = palimpsa_attention(
        q, k, v, beta, log_alpha, initial_state=state, output_final_state=True, output_uncertainty=True
    )
    assert o.shape == var.shape == (2, 0, 2, 3)
    assert torch.equal(mu, state[0]) and torch.equal(precision, state[1])
    _, (mu, precision) = palimpsa_attention(q, k, v, beta, log_alpha, prior_precision=2.0, output_final_state=True)
    assert torch.equal(mu, torch.zeros_like(mu)) and torch.equal(precision, torch.full_like(precision, 2.0))


def test_triton_impl_refuses_clearly_when_it_cannot_run(monkeypatch):
    q, k, v, beta, log_alpha, _ = make_inputs(B=1, T=4, H=1, K=4, V=4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="need a CUDA GPU.*impl='chunk'"):
        palimpsa_attention(q, k, v, beta, log_alpha, impl="triton")  # CPU tensors, no interpreter
    monkeypatch.setitem(sys.modules, "amformers.modeling.kernels.palimpsa_triton", None)  # as if not installed
    with pytest.raises(RuntimeError, match="needs Triton, which is not installed.*impl='chunk'"):
        palimpsa_attention(q, k, v, beta, log_alpha, impl="triton")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_65536_tokens_stay_finite(autocast):
    """A long sequence with extreme gates (near-total forgetting, large importance) in one chunked call."""
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 1, 65536, 1, 4, 4
    dtype = torch.bfloat16 if autocast else torch.float32
    q = torch.randn(B, T, H, K, generator=g).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, V, generator=g).to(dtype)
    beta = (10 * torch.rand(B, T, H, V, generator=g) ** 4).to(dtype)
    log_alpha = -(torch.rand(B, T, H, generator=g) ** 8) * 30  # mostly slow, sometimes total forgetting
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        o, (mu, precision), var = palimpsa_attention(
            q, k, v, beta, log_alpha, output_final_state=True, output_uncertainty=True
        )
    assert o.dtype == dtype and mu.dtype == torch.float32
    for name, x in (("o", o), ("mu", mu), ("I", precision), ("var", var)):
        assert torch.isfinite(x).all(), name
    assert (precision >= 1.0 - 1e-6).all()  # precision never drops below the prior from a state at the prior


def test_bad_inputs_get_clear_errors():
    q, k, v, beta, log_alpha, state = make_inputs(B=1, T=3, H=2, K=4, V=3, with_state=True, dtype=torch.float32)
    cases = [
        (dict(q=q[0]), "q.*batch, seq_len, heads"),
        (dict(k=k[..., :3]), "`k` must have the shape of `q`"),
        (dict(v=v[:, :2]), "`v` must be"),
        (dict(beta=beta[..., :2]), "`beta` must have the shape of `v`"),
        (dict(log_alpha=log_alpha[..., None]), "`log_alpha` must be"),
        (dict(beta=-beta), "beta.*>= 0"),
        (dict(log_alpha=-log_alpha), "log_alpha.*<= 0"),
        (dict(prior_precision=0.0), "prior_precision.*> 0"),
        (dict(prior_precision=torch.ones(3)), "prior_precision.*\\[2\\]"),
        (dict(initial_state=(state[0],)), "pair"),
        (dict(initial_state=(state[0][..., :2], state[1])), "initial_state.*mu"),
        (dict(impl="cuda"), "impl"),
    ]
    for change, message in cases:
        arguments = dict(q=q, k=k, v=v, beta=beta, log_alpha=log_alpha) | change
        positional = [arguments.pop(name) for name in ("q", "k", "v", "beta", "log_alpha")]
        with pytest.raises((ValueError, TypeError), match=message):
            palimpsa_attention(*positional, **arguments)
