"""Chunked-parallel PyTorch Palimpsa: the fast path on CPU (and a correct one anywhere).

The recurrence (see `palimpsa.py`) is linear in the numerator M_t = I_t * mu_t and in the excess precision
E_t = I_t - Ip; both are scalar-decay outer-product scans:

    M_t = a_t M_{t-1} + v_t k_t^T,      E_t = a_t E_{t-1} + beta_t (k_t^2)^T,      I_t = Ip + E_t,

so the state at every chunk start follows from one batched matrix product per chunk and a short scan over
chunks, after which all chunks can be scanned *in parallel*. The only non-linearity is the elementwise division
mu_t = M_t / I_t before the contraction with q_t; it has no low-rank form, so every token must see its own
[V, K] precision (the official Triton kernel materialises it too). We never divide by a cumulative decay (which
over/underflows for strong forgetting): each step of the scan is the plain recurrence, run for one position of
all chunks at once. T tokens in chunks of C cost C + T/C Python steps of elementwise work on [B*H, T/C, V, K]
tensors, O(T V K) work in total; (M, E) and (v, beta), (k, k^2) are stacked so one op updates both.

The backward pass is written by hand (autograd through the scan would keep every per-token state). It
recomputes the per-token states from the saved chunk-start states (in groups of chunks that fit in cache), runs
the adjoint recurrence in reverse (again for all chunks at once, with zero carry), and then adds the carry from
later chunks, which is linear, with one more scan over chunks and a few matrix products. With adjoints
G^_t = dL/dM_t and H^_t = dL/dE_t (direct terms G_t = scale do_t (q_t / I_t)^T, H_t = -G_t * mu_t):

    dv_t = G^_t k_t,   dbeta_t = H^_t k_t^2,   dk_t = G^_t^T v_t + 2 k_t * (H^_t^T beta_t),
    dq_t = scale mu_t^T do_t,

and the forgetting gradient needs no per-token state: with y_t = <G_t, M_t> + <H_t, E_t> = -Ip * sum(H_t)
(minus <dvar_t, var_t> when the uncertainty is differentiated), for a chunk ending at e,

    dlog_alpha_t = sum_{u = t..e} (y_u - v_u . dv_u - beta_u . dbeta_u) + <R_e, (M_e, E_e)>,

where R_e is the adjoint arriving from after the chunk (derivation: X_t = <G^_t, M_t> + <H^_t, E_t> equals
dlog_alpha_t + v_t . dv_t + beta_t . dbeta_t and also y_t + dlog_alpha_{t+1}).
"""

import math
import threading

import torch

# The backward pass recomputes per-token states for groups of chunks at a time, at most this many bytes per group
# (plus one scratch buffer of this size kept per thread, see `_workspace`). Fewer groups means fewer Python-level
# steps (at T=2048, B=1, H=4: one group at 128 MiB, two at 64 MiB).
BACKWARD_STATE_BYTES = 128 * 2**20


_workspaces = threading.local()


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch tensor kept between calls. On CPU every fresh allocation of this size is new memory that
    page-faults on first touch (measured ~20% of a backward pass); GPUs have a caching allocator already. At most
    BACKWARD_STATE_BYTES stay allocated; larger requests get fresh memory."""
    if device.type != "cpu" or numel * dtype.itemsize > BACKWARD_STATE_BYTES:
        return torch.empty(numel, dtype=dtype, device=device)
    cached = getattr(_workspaces, "tensor", None)
    if cached is None or cached.dtype != dtype or cached.numel() < numel:
        cached = _workspaces.tensor = torch.empty(numel, dtype=dtype)
    return cached[:numel]


def default_chunk_size(seq_len: int) -> int:
    """About sqrt(T), so the scan inside chunks and the scan over chunks take similar numbers of steps."""
    return int(min(64, max(16, 2 ** math.ceil(math.log2(max(seq_len, 1)) / 2))))


def _to_chunks(x: torch.Tensor, num_chunks: int, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, ...] -> [B*H, num_chunks, chunk_size, ...], zero-padded at the end."""
    B, T, H = x.shape[:3]
    x = x.to(dtype).transpose(1, 2)
    pad = num_chunks * chunk_size - T
    if pad:
        x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(B * H, num_chunks, chunk_size, *x.shape[3:])


def _from_chunks(x: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor:
    """[B*H, num_chunks, chunk_size, X] -> [B, T, H, X]."""
    BH, NC, C, X = x.shape
    return x.reshape(batch, BH // batch, NC * C, X)[:, :, :seq_len].transpose(1, 2)


def _prepare(q, k, v, beta, log_alpha, prior_precision, scale, initial_state, chunk_size, position_major):
    """Move everything to float32 (float64 stays float64) in the chunked layout: [B*H, chunks, C, ...], or with
    `position_major` [C, B*H, chunks, ...], so that one position of every chunk is a contiguous slice."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    C = chunk_size or default_chunk_size(T)
    NC = max(1, math.ceil(T / C))
    chunked = [_to_chunks(x, NC, C, dtype) for x in (q, k, v)]
    if beta is not None:
        chunked.append(_to_chunks(beta, NC, C, dtype))
    # Padded tokens carry log_alpha = 0 (a = 1) and zero inputs, so they leave the state untouched.
    chunked.append(_to_chunks(log_alpha[..., None], NC, C, dtype).squeeze(-1))
    if position_major:
        chunked = [x.movedim(2, 0).contiguous() for x in chunked]
    if isinstance(prior_precision, torch.Tensor):
        prior = prior_precision.to(device=q.device, dtype=dtype).expand(H)
    else:
        prior = torch.full((H,), float(prior_precision), device=q.device, dtype=dtype)
    prior = prior.expand(B, H).reshape(B * H)
    if initial_state is None:
        mu0 = precision0 = None
    else:
        mu0, precision0 = (x.to(dtype).reshape(B * H, V, K) for x in initial_state)
    return chunked, prior, mu0, precision0, (K**-0.5 if scale is None else scale), (B, T, H, V, K)


def _chunk_decays(log_alpha: torch.Tensor, dim: int):
    """Along the chunk positions `dim`: cumulative log decay, the decay from each token to its chunk's end
    (product of a over the later tokens, <= 1), and the decay of the whole chunk."""
    cum = log_alpha.cumsum(dim)
    last = cum.select(dim, -1)
    return cum, torch.exp(last.unsqueeze(dim) - cum), torch.exp(last)


def _chunk_start_states(inputs, keys, log_alpha, prior, mu0, precision0):
    """The state S = (M, E) at every chunk start ([2, BH, NC, V, K]) and after the last chunk ([2, BH, V, K]),
    where M = I * mu is the numerator and E = I - Ip the excess precision; both follow S_t = a_t S_{t-1} +
    x_t (outer) y_t with (x, y) = (v, k) for M and (beta, k^2) for E.

    `inputs` = (v, beta) and `keys` = (k, k^2) come stacked and position-major: [C, 2, BH, NC, ...]. What a chunk
    adds is one batched matrix product; the carry from chunk to chunk is a short scan.
    """
    C, _, BH, NC, V = inputs.shape
    K = keys.shape[-1]
    _, to_end, chunk_decay = _chunk_decays(log_alpha, 0)
    local = torch.einsum("csbnv,csbnk->sbnvk", inputs * to_end[:, None, ..., None], keys)
    if mu0 is None:
        state = keys.new_zeros(2, BH, V, K)
    else:
        state = torch.stack([precision0 * mu0, precision0 - prior[:, None, None]])
    starts = keys.new_empty(2, BH, NC, V, K)
    for c in range(NC):
        starts[:, :, c] = state
        state = chunk_decay[:, c, None, None] * state + local[:, :, c]
    return starts, state


def _scan_tokens(inputs, keys, decay, starts):
    """The recurrence inside all chunks at once: yields (j, S_j) for every position j, S = (M, E) stacked as in
    `_chunk_start_states`. The yielded tensor is updated in place by the next step; copy what you keep."""
    state = starts.clone()
    # Per-position views listed once (`unbind`): indexing inside the loop would cost more than some of the ops.
    decay = decay[:, None, ..., None, None].unbind(0)
    inputs, keys = inputs[..., None].unbind(0), keys[..., None, :].unbind(0)
    for j in range(len(inputs)):
        state.mul_(decay[j]).addcmul_(inputs[j], keys[j])
        yield j, state


class PalimpsaChunkFunction(torch.autograd.Function):
    """Palimpsa on position-major chunked tensors ([C, B*H, chunks, ...]) with a hand-written backward (see the
    module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, prior, mu0, precision0, scale, output_uncertainty):
        inputs, keys = torch.stack([v, beta], dim=1), torch.stack([k, k * k], dim=1)
        C, _, BH, NC, K = keys.shape
        V = v.shape[-1]
        starts, final = _chunk_start_states(inputs, keys, log_alpha, prior, mu0, precision0)
        prior4 = prior[:, None, None, None]
        # Per position, o_j = mu_j q_j is computed as the row q_j^T times mu_j^T (a batched matrix product on 3-D
        # views, written straight into o): unlike `(mu_j * q_j).sum(-1)` it writes no temporary the size of the
        # state.
        rows = BH * NC
        q_rows = q.reshape(C, rows, 1, K)
        o = v.new_empty(C, rows, 1, V)
        var = torch.empty_like(o) if output_uncertainty else v.new_empty(0)
        squares = (q_rows * q_rows).unbind(0) if output_uncertainty else None
        q_rows, o_rows, var_rows = q_rows.unbind(0), o.unbind(0), var.unbind(0)
        buffer = torch.empty_like(starts[0])
        buffer_t = buffer.view(rows, V, K).mT
        for j, (M, E) in _scan_tokens(inputs, keys, log_alpha.exp(), starts):
            torch.add(E, prior4, out=buffer)  # I_j
            if output_uncertainty:
                buffer.reciprocal_()
                torch.bmm(squares[j], buffer_t, out=var_rows[j])
                buffer.mul_(M)  # mu_j = M_j / I_j
            else:
                torch.div(M, buffer, out=buffer)  # mu_j
            torch.bmm(q_rows[j], buffer_t, out=o_rows[j])
        o = o.view_as(v).mul_(scale)
        var = var.view_as(v) if output_uncertainty else var
        ctx.save_for_backward(q, inputs, keys, log_alpha, prior, mu0, precision0, starts, final)
        ctx.scale, ctx.device_type = scale, q.device.type
        ctx.set_materialize_grads(False)
        final_I = final[1] + prior[:, None, None]
        return o, var, final[0] / final_I, final_I

    @staticmethod
    def backward(ctx, d_o, d_var, d_mu_final, d_I_final):
        with torch.autocast(ctx.device_type, enabled=False):
            return PalimpsaChunkFunction._backward(ctx, d_o, d_var, d_mu_final, d_I_final)

    @staticmethod
    def _backward(ctx, d_o, d_var, d_mu_final, d_I_final):
        q, inputs, keys, log_alpha, prior, mu0, precision0, starts, final = ctx.saved_tensors
        C, _, BH, NC, V = inputs.shape
        K = q.shape[-1]
        v, beta, k = inputs[:, 0], inputs[:, 1], keys[:, 0]
        prior4 = prior[:, None, None, None]
        scaled_do = q.new_zeros(C, BH, NC, V) if d_o is None else d_o * ctx.scale
        d_var = d_var if d_var is not None and d_var.numel() else None

        # Adjoint of the final S = (M, E) from the final-state outputs mu = M / I and I = E + Ip.
        final_I = final[1] + prior[:, None, None]
        carry = torch.zeros_like(final)
        if d_mu_final is not None:
            carry[0] = d_mu_final / final_I
            carry[1] = -d_mu_final * final[0] / (final_I * final_I)
        if d_I_final is not None:
            carry[1] += d_I_final
        final_adjoint_E = carry[1].clone()

        # Gradients w.r.t. the stacked inputs (v, beta) and (k, k^2 as a function of k), then q.
        d_inputs = torch.zeros_like(inputs)
        d_k = q.new_zeros(C, BH, NC, K)
        dq = torch.zeros_like(q)
        sum_H = q.new_zeros(C, BH, NC)  # sum over (v, k) of the direct precision gradient H_t
        var_dot = q.new_zeros(C, BH, NC)  # <dvar_t, var_t>
        local_start = torch.empty_like(starts)
        decay = log_alpha.exp()
        per_chunk_bytes = 2 * C * BH * V * K * q.element_size()
        num_groups = math.ceil(NC / max(1, min(NC, BACKWARD_STATE_BYTES // per_chunk_bytes)))
        group = math.ceil(NC / num_groups)  # equal groups
        # Reused by every group (fresh memory would page-fault on first touch, group after group), always as a
        # contiguous prefix so that the last, smaller group is contiguous too.
        buffers = _workspace(2 * C * BH * group * V * K, q.dtype, q.device).view(2, -1)
        for g0 in range(0, NC, group):
            g = slice(g0, min(g0 + group, NC))
            q_g, inputs_g, keys_g, decay_g, do_g = (
                q[:, :, g],
                inputs[:, :, :, g],
                keys[:, :, :, g],
                decay[:, :, g],
                scaled_do[:, :, g],
            )
            # 1. Recompute mu_j and I_j at every position of these chunks.
            n = g.stop - g.start
            rows = BH * n
            shape = (C, BH, n, V, K)
            mus, precisions = (b[: math.prod(shape)].view(shape) for b in buffers)
            for j, (M, E) in _scan_tokens(inputs_g, keys_g, decay_g, starts[:, :, g]):
                torch.add(E, prior4, out=precisions[j])
                torch.div(M, precisions[j], out=mus[j])
            # 2. Adjoint recurrence backwards through the chunks, carry from later chunks left out (added below).
            # A = (G^, -H^): the adjoints of M and of E, the second negated so one addcmul_ updates both.
            # Per position the loop does only the state-sized arithmetic, on views listed before the loop; the
            # contractions with the states are batched row-times-matrix products (the fast form, see `forward`)
            # written into per-position rows and combined after the loop.
            from_keys = q.new_empty(C, 2, BH, n, 1, V)  # (G^ k_j, -H^ k_j^2) for d(v, beta)
            from_inputs = q.new_empty(C, 2, BH, n, 1, K)  # (v_j^T G^, beta_j^T (-H^)) for dk
            from_mu = q.new_empty(C, BH, n, 1, K)  # do_j^T mu_j for dq
            adjoint = q.new_zeros(2, BH, n, V, K)
            adjoint_3d = adjoint.view(2 * rows, V, K)
            direct = torch.empty_like(adjoint)  # (q / I, q mu / I): G_t = do_t (outer) direct[0], -H_t = ... [1]
            direct_q, direct_mu = direct.unbind(0)
            precisions_j, mus_j = precisions.unbind(0), mus.unbind(0)
            mus_3d = mus.view(C, rows, V, K).unbind(0)
            decay_j = decay_g[:, None, :, :, None, None].unbind(0)
            q_rows, do_cols = q_g[..., None, :].unbind(0), do_g[..., None].unbind(0)
            do_rows = do_g.reshape(C, rows, 1, V).unbind(0)
            inputs_rows = inputs_g.reshape(C, 2 * rows, 1, V).unbind(0)
            keys_rows = keys_g.reshape(C, 2 * rows, 1, K).unbind(0)
            from_keys_j = from_keys.view(C, 2 * rows, 1, V).unbind(0)
            adjoint_sums = q.new_empty(C, BH, n)  # sum(-H^_j), for sum(H_j) below
            adjoint_sums_j = adjoint_sums.unbind(0)
            from_inputs_j = from_inputs.view(C, 2 * rows, 1, K).unbind(0)
            from_mu_j = from_mu.view(C, rows, 1, K).unbind(0)
            for j in reversed(range(C)):
                if j < C - 1:
                    adjoint.mul_(decay_j[j + 1])
                torch.div(q_rows[j], precisions_j[j], out=direct_q)
                torch.mul(direct_q, mus_j[j], out=direct_mu)
                if d_var is not None:  # var = sum_k q^2 / I adds H_t = -dvar (outer) q^2 / I^2
                    q_j, dvar_j = q_g[j], d_var[j, :, g]
                    dq[j, :, g] = 2 * q_j * (dvar_j[..., None, :] @ precisions[j].reciprocal()).squeeze(-2)
                    var_dot[j, :, g] = ((dvar_j[..., None, :] @ direct_q).squeeze(-2) * q_j).sum(-1)
                    adjoint[1].addcmul_(dvar_j[..., None], direct_q.square())
                adjoint.addcmul_(do_cols[j], direct)
                torch.bmm(do_rows[j], mus_3d[j], out=from_mu_j[j])
                torch.bmm(keys_rows[j], adjoint_3d.mT, out=from_keys_j[j])
                torch.sum(adjoint[1], (-1, -2), out=adjoint_sums_j[j])
                torch.bmm(inputs_rows[j], adjoint_3d, out=from_inputs_j[j])
            dq[:, :, g] += from_mu.squeeze(-2)
            d_inputs[:, :, :, g] = from_keys.squeeze(-2)
            # dk_t = G^^T v_t + 2 k_t (H^^T beta_t)
            d_k[:, :, g] = from_inputs[:, 0, ..., 0, :] - 2 * keys_g[:, 0] * from_inputs[:, 1, ..., 0, :]
            # The direct precision gradient from its accumulated adjoint: H_j = H^_j - a_{j+1} H^_{j+1} (the
            # sums are of -H^).
            adjoint_sums[:-1] -= decay_g[1:] * adjoint_sums[1:]
            sum_H[:, :, g] = -adjoint_sums
            local_start[:, :, g] = decay_g[0][..., None, None] * adjoint
        d_inputs[:, 1].neg_()  # undo the sign of -H^
        local_start[1].neg_()

        # 3. Adjoints arriving at each chunk's end from everything after it (a scan over chunks).
        _, to_end, chunk_decay = _chunk_decays(log_alpha, 0)
        arriving = torch.empty_like(starts)
        for c in reversed(range(NC)):
            arriving[:, :, c] = carry
            carry = local_start[:, :, c] + chunk_decay[:, c, None, None] * carry
        # carry is now the adjoint of the initial (M_0, E_0).

        # 4. What the arriving adjoints add to each token's gradients: they reach token t decayed by to_end[t].
        w = to_end[..., None]
        d_inputs += w[:, None] * torch.einsum("sbnvk,csbnk->csbnv", arriving, keys)
        from_arriving = torch.einsum("csbnv,sbnvk->csbnk", inputs, arriving)
        d_k += w * (from_arriving[:, 0] + 2 * k * from_arriving[:, 1])
        dv, dbeta = d_inputs[:, 0], d_inputs[:, 1]

        # 5. Forgetting gradient from local quantities (module docstring).
        z = -prior[:, None] * sum_H - var_dot - (v * dv).sum(-1) - (beta * dbeta).sum(-1)
        ends = torch.cat([starts[:, :, 1:], final[:, :, None]], dim=2)
        boundary = (arriving * ends).sum((0, -1, -2))
        d_log_alpha = z.flip(0).cumsum(0).flip(0) + boundary

        d_mu0 = d_precision0 = d_prior = None
        if mu0 is not None:
            d_mu0 = carry[0] * precision0
            d_precision0 = carry[0] * mu0 + carry[1]
        if ctx.needs_input_grad[5]:
            # I_t = Ip + E_t where E does not depend on Ip, except through E_0 = I_0 - Ip for a given state.
            d_prior = sum_H.sum((0, 2)) + final_adjoint_E.sum((-1, -2))
            if precision0 is not None:
                d_prior = d_prior - carry[1].sum((-1, -2))
        return dq, d_k, dv, dbeta, d_log_alpha, d_prior, d_mu0, d_precision0, None, None


def palimpsa_chunk(
    q,
    k,
    v,
    beta,
    log_alpha,
    prior_precision=1.0,
    scale=None,
    initial_state=None,
    output_final_state=False,
    output_uncertainty=False,
    chunk_size=None,
):
    """Chunked-parallel Palimpsa; arguments and return values as `palimpsa_attention` (beta must be a tensor)."""
    chunked, prior, mu0, precision0, scale, (B, T, H, V, K) = _prepare(
        q, k, v, beta, log_alpha, prior_precision, scale, initial_state, chunk_size, position_major=True
    )
    o, var, mu_final, I_final = PalimpsaChunkFunction.apply(*chunked, prior, mu0, precision0, scale, output_uncertainty)
    o = _from_chunks(o.movedim(0, 2), B, T).to(q.dtype)
    final_state = None
    if output_final_state:
        final_state = (mu_final.reshape(B, H, V, K), I_final.reshape(B, H, V, K))
    if output_uncertainty:
        return o, final_state, _from_chunks(var.movedim(0, 2), B, T).to(q.dtype)
    return o, final_state


def gated_linear_attention_chunk(
    q, k, v, log_alpha, prior_precision=1.0, scale=None, initial_state=None, output_final_state=False, chunk_size=64
):
    """Palimpsa with beta = 0 and I_0 = Ip: plain gated linear attention divided by Ip, all matrix products.

    o_t = (scale / Ip) S_t q_t with S_t = a_t S_{t-1} + v_t k_t^T; S is the numerator M, so mu = S / Ip.
    Differentiated by autograd (every step is a batched matmul or an elementwise op on [T, C] scores).
    """
    chunked, prior, mu0, precision0, scale, (B, T, H, V, K) = _prepare(
        q, k, v, None, log_alpha, prior_precision, scale, initial_state, chunk_size, position_major=False
    )
    q_c, k_c, v_c, log_alpha_c = chunked
    BH, NC, C, _ = q_c.shape
    cum, to_end, chunk_decay = _chunk_decays(log_alpha_c, -1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay from token s to token t inside a chunk; -inf above the diagonal so exp() gives exactly 0
    decay_ts = torch.exp((cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")))
    o = ((q_c @ k_c.transpose(-1, -2)) * decay_ts) @ v_c
    local = (v_c * to_end[..., None]).transpose(-1, -2) @ k_c
    state = q_c.new_zeros(BH, V, K) if mu0 is None else mu0 * precision0
    starts = []
    for c in range(NC):
        starts.append(state)
        state = chunk_decay[:, c, None, None] * state + local[:, c]
    starts = torch.stack(starts, dim=1)
    o = o + (q_c * cum.exp()[..., None]) @ starts.transpose(-1, -2)
    o = o * (scale / prior[:, None, None, None])
    o = _from_chunks(o, B, T).to(q.dtype)
    final_state = None
    if output_final_state:
        prior3 = prior[:, None, None]
        final_state = ((state / prior3).reshape(B, H, V, K), prior3.expand(BH, V, K).reshape(B, H, V, K))
    return o, final_state


__all__ = ["gated_linear_attention_chunk", "palimpsa_chunk"]
