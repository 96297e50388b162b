"""Palimpsa in Triton: chunked scan (forward + backward) for training and prefill, fused recurrent step for decoding.

The recurrence (contract of `palimpsa.palimpsa_attention`, whose `impl="reference"` token loop is the twin these
kernels are tested against), per batch and head, with state (mu, I) of shape [V, K]:

    I_t  = a_t I_{t-1} + (1 - a_t) Ip + beta_t (x) k_t^2          a_t = exp(log_alpha_t)
    M_t  = a_t (I_{t-1} * mu_{t-1}) + v_t (x) k_t,   mu_t = M_t / I_t
    o_t  = scale * mu_t q_t,                         var_t[v] = sum_k q_t[k]^2 / I_t[v, k]   (optional)

Both M (= I * mu) and Ibar (= I - Ip) are linear scalar-decay scans, Ibar_t = a_t Ibar_{t-1} + beta_t (x) k_t^2, so
a chunk of BT tokens is one `tl.associative_scan` over [BT, BV, BK] tiles (combine (a, x) . (a', x') =
(a a', a' x + x')) plus the decayed carry from the previous chunk; the state is carried in fp32 from chunk to chunk.
The only non-linearity, mu = M / I before the contraction with q, is elementwise, so every token's state must be
formed (no tensor-core form exists for a per-row beta; see papers-palimpsa.md section 3.3).

Backward: the forward stores each chunk's start state (M, Ibar) in fp32; the backward walks the chunks in
reverse, recomputes the chunk's states from its checkpoint, forms the direct gradients dM = dmu / I,
dIbar = -dmu mu / I (dmu = scale do (x) q, plus the var term), and accumulates them backwards with a reverse
scan, G_t = g_t + a_{t+1} G_{t+1}, carrying G across chunks. Then dv = G_M k, dbeta = G_I k^2,
dk = G_M^T v + 2 k (G_I^T beta), dq = scale mu^T do, dlog_alpha_t = sum(G_M (M_t - v k) + G_I (Ibar_t - beta k^2))
(= a_t sum(G_M M_{t-1} + G_I Ibar_{t-1})), and the initial state gets d mu_0 = G_M I_0, d I_0 = G_M mu_0 + G_I.
Programs tile (V, K); sums over the other tile axis are written as per-tile fp32 partials and added by torch.

Cost per token and head (K = V = 128, BT = 16, BV = BK = 16, 2-byte inputs):
    forward FLOPs    ~25 K V = 410k elementwise fp32 (outer products 2, scan ~10, carry 5, divide ~4,
                     q-contraction 2, +3 with uncertainty); no matrix products, so CUDA cores, not tensor cores
    forward bytes    inputs 2 (2K + 2V) + 4 = 1 kB (re-read per tile from L2), o partials 4 V K/BK = 4 kB
                     written + 4 kB read by the sum, checkpoints 2 * 4 V K / BT = 8 kB written: ~17 kB
    backward FLOPs   ~60 K V = 980k (recompute ~20, direct gradients ~10, reverse scan ~10, five reductions ~20)
    backward bytes   checkpoints 8 kB read, inputs + do 1.3 kB, partials for dq, dk (4 K V/BV each) and dv,
                     dbeta (4 V K/BK each) 16 kB written + 16 kB read by the sums: ~41 kB
Expected bound: on an H100 (~60 TFLOP/s fp32 non-tensor, 3.35 TB/s) the forward needs ~7 ns of ALU per
token-head against ~5 ns of HBM traffic, the backward ~16 ns against ~12 ns: elementwise-ALU-bound, with
the checkpoint and partial-sum traffic close behind (a fused on-chip reduction of the partials would cut it).
The fp32 division (MUFU reciprocal at 1/4 rate) is the costliest single op. A simple-GLA / Mamba2 chunk kernel
of the same state size does ~4 K V FLOPs per token on tensor cores, which is why Palimpsa's scan is many times
slower per token (the paper's reported limitation; bench/gpu_kernels.py measures the ratio against fla's
chunk_simple_gla).

Decoding (`palimpsa_recurrent_step_triton`, T <= 64, forward only): one program per (value tile, batch*head)
holds a [BV, K] slice of the state in registers, steps through the tokens and writes the state back in place.
`palimpsa_attention_triton` itself takes this kernel (on a copy of the state) for T <= 64 when no gradient is
needed, like fla's layers switching to fused_recurrent for short inputs.
Per token ~10 K V FLOPs and 2 * 2 * 4 V K bytes of state read + written once per call (not per token): a
one-token step is bound by the state traffic, 128 kB per head at K = V = 128.

Testing on CPU: import with TRITON_INTERPRET=1 set (before triton is imported): the kernels then run in Triton's
interpreter on CPU tensors, fp32 only. Block sizes are fixed (no autotuning, which needs a GPU driver).
"""

import torch
import triton
import triton.language as tl

from .triton_support import require_triton_device

# @triton.jit decides at decoration time whether it builds an interpreted function: remember which we got.
INTERPRETED = bool(triton.knobs.runtime.interpret)

# (chunk BT, value tile BV, key tile BK, warps). The interpreter gets small tiles so tiny test shapes still cover
# several chunks and tiles of each axis; on a GPU BT*BV*BK = 4096 fp32 per [BT, BV, BK] tile keeps the scan in
# registers (4 warps: 32 values per thread per live tile).
_CHUNK_CONFIG = (8, 4, 4, 1) if INTERPRETED else (16, 16, 16, 4)
_STEP_BLOCK_V, _STEP_WARPS = (4, 1) if INTERPRETED else (16, 4)
MAX_STEP_TOKENS = 64


@triton.jit
def _decay_combine(a1, m1, i1, a2, m2, i2):
    """Scan operator of two linear decays sharing their factor: (a, M, I) then (a', M', I')."""
    return a1 * a2, a2 * m1 + m2, a2 * i1 + i2


@triton.jit
def _palimpsa_chunk_fwd_kernel(
    Q, K, V, BETA, LOG_ALPHA, PRIOR, MU0, I0, O_PART, VAR_PART, CKPT_M, CKPT_I, MU_T, I_T,
    T, H, DK, DV, NT, scale,
    HAS_INIT: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr, UNCERTAINTY: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    i_v = tl.program_id(0)
    i_k = tl.program_id(1)
    i_bh = tl.program_id(2)
    b = i_bh // H
    h = i_bh % H
    B = tl.num_programs(2) // H
    prior = tl.load(PRIOR + h)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_t = tl.arange(0, BT)
    in_state = (offs_v[:, None] < DV) & (offs_k[None, :] < DK)
    state_offs = (i_bh * DV + offs_v[:, None]) * DK + offs_k[None, :]

    # Carried state: numerator M = I * mu and Ibar = I - prior, both fp32.
    m_state = tl.zeros([BV, BK], dtype=tl.float32)
    i_state = tl.zeros([BV, BK], dtype=tl.float32)
    if HAS_INIT:
        precision0 = tl.load(I0 + state_offs, mask=in_state, other=prior)
        m_state = precision0 * tl.load(MU0 + state_offs, mask=in_state, other=0.0)
        i_state = precision0 - prior

    for c in range(NT):
        if SAVE_CHECKPOINTS:
            ckpt_offs = ((i_bh * NT + c) * DV + offs_v[:, None]) * DK + offs_k[None, :]
            tl.store(CKPT_M + ckpt_offs, m_state, mask=in_state)
            tl.store(CKPT_I + ckpt_offs, i_state, mask=in_state)
        t = c * BT + offs_t
        in_t = t < T
        row = (b * T + t) * H + h  # [BT] index of (b, t, h); padded tail tokens are identity steps
        log_a = tl.load(LOG_ALPHA + row, mask=in_t, other=0.0).to(tl.float32)
        k_mask = in_t[:, None] & (offs_k[None, :] < DK)
        v_mask = in_t[:, None] & (offs_v[None, :] < DV)
        k = tl.load(K + row[:, None] * DK + offs_k[None, :], mask=k_mask, other=0.0).to(tl.float32)
        q = tl.load(Q + row[:, None] * DK + offs_k[None, :], mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(V + row[:, None] * DV + offs_v[None, :], mask=v_mask, other=0.0).to(tl.float32)
        beta = tl.load(BETA + row[:, None] * DV + offs_v[None, :], mask=v_mask, other=0.0).to(tl.float32)

        decay = tl.broadcast_to(tl.exp(log_a)[:, None, None], [BT, BV, BK])
        write_m = v[:, :, None] * k[:, None, :]
        write_i = beta[:, :, None] * (k * k)[:, None, :]
        decay_from_start, scan_m, scan_i = tl.associative_scan((decay, write_m, write_i), 0, _decay_combine)
        m_t = decay_from_start * m_state[None, :, :] + scan_m
        ibar_t = decay_from_start * i_state[None, :, :] + scan_i
        precision_t = ibar_t + prior
        mu_t = m_t / precision_t
        o = scale * tl.sum(mu_t * q[:, None, :], 2)  # [BT, BV], partial over this key tile
        part_offs = (((i_k * B + b) * T + t[:, None]) * H + h) * DV + offs_v[None, :]  # [NK, B, T, H, V]
        tl.store(O_PART + part_offs, o, mask=v_mask)
        if UNCERTAINTY:
            var = tl.sum((q * q)[:, None, :] / precision_t, 2)
            tl.store(VAR_PART + part_offs, var, mask=v_mask)
        is_last = (offs_t == BT - 1)[:, None, None]
        m_state = tl.sum(tl.where(is_last, m_t, 0.0), 0)
        i_state = tl.sum(tl.where(is_last, ibar_t, 0.0), 0)

    precision = i_state + prior
    tl.store(MU_T + state_offs, m_state / precision, mask=in_state)
    tl.store(I_T + state_offs, precision, mask=in_state)


@triton.jit
def _palimpsa_chunk_bwd_kernel(
    Q, K, V, BETA, LOG_ALPHA, PRIOR, MU0, I0, CKPT_M, CKPT_I, MU_T, I_T, DO, DVAR, DMU_T, DI_T,
    DQ_PART, DK_PART, DV_PART, DBETA_PART, DLOG_ALPHA_PART, DPRIOR_PART, DMU0, DI0,
    T, H, DK, DV, NT, scale,
    HAS_INIT: tl.constexpr, HAS_DVAR: tl.constexpr, HAS_DFINAL: tl.constexpr,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    i_v = tl.program_id(0)
    i_k = tl.program_id(1)
    i_bh = tl.program_id(2)
    n_k = tl.num_programs(1)
    B = tl.num_programs(2) // H
    b = i_bh // H
    h = i_bh % H
    prior = tl.load(PRIOR + h)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_t = tl.arange(0, BT)
    in_state = (offs_v[:, None] < DV) & (offs_k[None, :] < DK)
    state_offs = (i_bh * DV + offs_v[:, None]) * DK + offs_k[None, :]

    # Gradient flowing into the state (M, Ibar) at the end of the current chunk: from the final-state outputs first.
    g_m = tl.zeros([BV, BK], dtype=tl.float32)
    g_i = tl.zeros([BV, BK], dtype=tl.float32)
    if HAS_DFINAL:
        mu_final = tl.load(MU_T + state_offs, mask=in_state, other=0.0)
        precision_final = tl.load(I_T + state_offs, mask=in_state, other=1.0)
        d_mu_final = tl.load(DMU_T + state_offs, mask=in_state, other=0.0)
        g_m = d_mu_final / precision_final
        g_i = tl.load(DI_T + state_offs, mask=in_state, other=0.0) - g_m * mu_final
    # dL/dprior: I_t = Ibar_t + prior for every t (the final state included), and Ibar_0 = I_0 - prior.
    d_prior = tl.sum(tl.sum(g_i, 1), 0)

    for c_rev in range(NT):
        c = NT - 1 - c_rev
        ckpt_offs = ((i_bh * NT + c) * DV + offs_v[:, None]) * DK + offs_k[None, :]
        m_start = tl.load(CKPT_M + ckpt_offs, mask=in_state, other=0.0)
        i_start = tl.load(CKPT_I + ckpt_offs, mask=in_state, other=0.0)
        t = c * BT + offs_t
        in_t = t < T
        row = (b * T + t) * H + h
        log_a = tl.load(LOG_ALPHA + row, mask=in_t, other=0.0).to(tl.float32)
        # a_{t+1}, the factor G_{t+1} reaches G_t through; the last token of a chunk gets the carry instead.
        next_in_chunk = (offs_t + 1 < BT) & (t + 1 < T)
        log_a_next = tl.load(LOG_ALPHA + row + H, mask=next_in_chunk, other=0.0).to(tl.float32)
        k_mask = in_t[:, None] & (offs_k[None, :] < DK)
        v_mask = in_t[:, None] & (offs_v[None, :] < DV)
        k = tl.load(K + row[:, None] * DK + offs_k[None, :], mask=k_mask, other=0.0).to(tl.float32)
        q = tl.load(Q + row[:, None] * DK + offs_k[None, :], mask=k_mask, other=0.0).to(tl.float32)
        v = tl.load(V + row[:, None] * DV + offs_v[None, :], mask=v_mask, other=0.0).to(tl.float32)
        beta = tl.load(BETA + row[:, None] * DV + offs_v[None, :], mask=v_mask, other=0.0).to(tl.float32)
        do = tl.load(DO + row[:, None] * DV + offs_v[None, :], mask=v_mask, other=0.0).to(tl.float32)

        # Recompute the chunk's states from its checkpoint (as in the forward).
        decay = tl.broadcast_to(tl.exp(log_a)[:, None, None], [BT, BV, BK])
        k_sq = k * k
        write_m = v[:, :, None] * k[:, None, :]
        write_i = beta[:, :, None] * k_sq[:, None, :]
        decay_from_start, scan_m, scan_i = tl.associative_scan((decay, write_m, write_i), 0, _decay_combine)
        m_t = decay_from_start * m_start[None, :, :] + scan_m
        ibar_t = decay_from_start * i_start[None, :, :] + scan_i
        inv_precision = 1.0 / (ibar_t + prior)
        mu_t = m_t * inv_precision

        # Direct gradients of this chunk's states, then accumulated backwards: G_t = g_t + a_{t+1} G_{t+1}.
        d_mu = (scale * do)[:, :, None] * q[:, None, :]
        direct_m = d_mu * inv_precision
        direct_i = -direct_m * mu_t
        dq = scale * tl.sum(do[:, :, None] * mu_t, 1)
        if HAS_DVAR:
            dvar = tl.load(DVAR + row[:, None] * DV + offs_v[None, :], mask=v_mask, other=0.0).to(tl.float32)
            direct_i -= dvar[:, :, None] * (q * q)[:, None, :] * inv_precision * inv_precision
            dq += 2.0 * q * tl.sum(dvar[:, :, None] * inv_precision, 1)
        d_prior += tl.sum(tl.sum(tl.sum(direct_i, 2), 1), 0)
        is_last = (offs_t == BT - 1)[:, None, None]
        direct_m += tl.where(is_last, g_m[None, :, :], 0.0)
        direct_i += tl.where(is_last, g_i[None, :, :], 0.0)
        decay_next = tl.broadcast_to(tl.exp(log_a_next)[:, None, None], [BT, BV, BK])
        _, grad_m, grad_i = tl.associative_scan((decay_next, direct_m, direct_i), 0, _decay_combine, reverse=True)

        dv = tl.sum(grad_m * k[:, None, :], 2)
        dbeta = tl.sum(grad_i * k_sq[:, None, :], 2)
        dk = tl.sum(grad_m * v[:, :, None], 1) + 2.0 * k * tl.sum(grad_i * beta[:, :, None], 1)
        dlog_a = tl.sum(tl.sum(grad_m * (m_t - write_m) + grad_i * (ibar_t - write_i), 2), 1)

        v_part = (((i_k * B + b) * T + t[:, None]) * H + h) * DV + offs_v[None, :]
        k_part = (((i_v * B + b) * T + t[:, None]) * H + h) * DK + offs_k[None, :]
        tl.store(DV_PART + v_part, dv, mask=v_mask)
        tl.store(DBETA_PART + v_part, dbeta, mask=v_mask)
        tl.store(DK_PART + k_part, dk, mask=k_mask)
        tl.store(DQ_PART + k_part, dq, mask=k_mask)
        tl.store(DLOG_ALPHA_PART + ((i_v * n_k + i_k) * B + b) * T * H + t * H + h, dlog_a, mask=in_t)

        is_first = (offs_t == 0)[:, None, None]
        g_m = tl.sum(tl.where(is_first, grad_m * decay, 0.0), 0)  # into the previous chunk's last state
        g_i = tl.sum(tl.where(is_first, grad_i * decay, 0.0), 0)

    if HAS_INIT:  # M_0 = I_0 mu_0 and Ibar_0 = I_0 - prior
        precision0 = tl.load(I0 + state_offs, mask=in_state, other=1.0)
        mu0 = tl.load(MU0 + state_offs, mask=in_state, other=0.0)
        tl.store(DMU0 + state_offs, g_m * precision0, mask=in_state)
        tl.store(DI0 + state_offs, g_m * mu0 + g_i, mask=in_state)
        d_prior -= tl.sum(tl.sum(g_i, 1), 0)
    tl.store(DPRIOR_PART + ((i_v * n_k + i_k) * B + b) * H + h, d_prior)


class _PalimpsaChunkScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, log_alpha, prior, mu0, precision0, scale, output_uncertainty):
        B, T, H, DK = q.shape
        DV = v.shape[-1]
        BT, BV, BK, warps = _CHUNK_CONFIG
        NT, NV, NK = triton.cdiv(T, BT), triton.cdiv(DV, BV), triton.cdiv(DK, BK)
        has_init = mu0 is not None
        save = any(ctx.needs_input_grad[:8])  # checkpoints only when a backward can follow
        f32 = dict(device=q.device, dtype=torch.float32)
        o_part = torch.empty(NK, B, T, H, DV, **f32)
        var_part = torch.empty(NK, B, T, H, DV, **f32) if output_uncertainty else o_part
        ckpt_m = torch.empty(B, H, NT, DV, DK, **f32) if save else o_part
        ckpt_i = torch.empty(B, H, NT, DV, DK, **f32) if save else o_part
        mu_final = torch.empty(B, H, DV, DK, **f32)
        precision_final = torch.empty(B, H, DV, DK, **f32)
        _palimpsa_chunk_fwd_kernel[(NV, NK, B * H)](
            q, k, v, beta, log_alpha, prior, mu0 if has_init else q, precision0 if has_init else q,
            o_part, var_part, ckpt_m, ckpt_i, mu_final, precision_final,
            T, H, DK, DV, NT, scale,
            HAS_INIT=has_init, SAVE_CHECKPOINTS=save, UNCERTAINTY=output_uncertainty,
            BT=BT, BV=BV, BK=BK, num_warps=warps,
        )  # fmt: skip
        o = o_part.sum(0).to(q.dtype)
        var = var_part.sum(0).to(q.dtype) if output_uncertainty else None
        if save:
            ctx.save_for_backward(
                q, k, v, beta, log_alpha, prior, mu0, precision0, ckpt_m, ckpt_i, mu_final, precision_final
            )
        ctx.scale, ctx.has_init = scale, has_init
        ctx.set_materialize_grads(False)
        return o, mu_final, precision_final, var

    @staticmethod
    def backward(ctx, do, d_mu_final, d_precision_final, dvar):
        q, k, v, beta, log_alpha, prior, mu0, precision0, ckpt_m, ckpt_i, mu_final, precision_final = ctx.saved_tensors
        B, T, H, DK = q.shape
        DV = v.shape[-1]
        BT, BV, BK, warps = _CHUNK_CONFIG
        NT, NV, NK = triton.cdiv(T, BT), triton.cdiv(DV, BV), triton.cdiv(DK, BK)
        f32 = dict(device=q.device, dtype=torch.float32)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        has_dfinal = d_mu_final is not None or d_precision_final is not None
        if has_dfinal:
            d_mu_final = torch.zeros_like(mu_final) if d_mu_final is None else d_mu_final.float().contiguous()
            d_precision_final = (
                torch.zeros_like(precision_final) if d_precision_final is None else d_precision_final.float()
            ).contiguous()
        dq_part, dk_part = torch.empty(NV, B, T, H, DK, **f32), torch.empty(NV, B, T, H, DK, **f32)
        dv_part, dbeta_part = torch.empty(NK, B, T, H, DV, **f32), torch.empty(NK, B, T, H, DV, **f32)
        dlog_alpha_part = torch.empty(NV * NK, B, T, H, **f32)
        dprior_part = torch.empty(NV * NK, B, H, **f32)
        dmu0 = torch.empty(B, H, DV, DK, **f32) if ctx.has_init else dq_part
        dprecision0 = torch.empty(B, H, DV, DK, **f32) if ctx.has_init else dq_part
        _palimpsa_chunk_bwd_kernel[(NV, NK, B * H)](
            q, k, v, beta, log_alpha, prior, mu0 if ctx.has_init else q, precision0 if ctx.has_init else q,
            ckpt_m, ckpt_i, mu_final, precision_final, do, dvar.contiguous() if dvar is not None else do,
            d_mu_final if has_dfinal else q, d_precision_final if has_dfinal else q,
            dq_part, dk_part, dv_part, dbeta_part, dlog_alpha_part, dprior_part, dmu0, dprecision0,
            T, H, DK, DV, NT, ctx.scale,
            HAS_INIT=ctx.has_init, HAS_DVAR=dvar is not None, HAS_DFINAL=has_dfinal,
            BT=BT, BV=BV, BK=BK, num_warps=warps,
        )  # fmt: skip
        grads = (
            dq_part.sum(0).to(q.dtype),
            dk_part.sum(0).to(k.dtype),
            dv_part.sum(0).to(v.dtype),
            dbeta_part.sum(0).to(beta.dtype),
            dlog_alpha_part.sum(0).to(log_alpha.dtype),
            dprior_part.sum((0, 1)),
            dmu0 if ctx.has_init else None,
            dprecision0 if ctx.has_init else None,
        )
        return (*grads, None, None)


def _check_inputs(q, k, v, beta, log_alpha, prior_precision, initial_state):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [batch, seq, heads, key_dim] alike; got {tuple(q.shape)}, {tuple(k.shape)}.")
    B, T, H, DK = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H) or beta.shape != v.shape:
        raise ValueError(
            f"v and beta must be [batch={B}, seq={T}, heads={H}, value_dim]; got {tuple(v.shape)}, {tuple(beta.shape)}."
        )
    if log_alpha.shape != (B, T, H):
        raise ValueError(f"log_alpha must be [batch, seq, heads] = {(B, T, H)}; got {tuple(log_alpha.shape)}.")
    dtypes = {x.dtype for x in (q, k, v, beta, log_alpha)}
    if not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        raise ValueError(f"Palimpsa's Triton kernels take fp32, fp16 or bf16 inputs; got {sorted(map(str, dtypes))}.")
    if isinstance(prior_precision, torch.Tensor):
        if prior_precision.dim() > 1 or prior_precision.numel() not in (1, H):
            raise ValueError(f"prior_precision must be a float or a [{H}] tensor; got {tuple(prior_precision.shape)}.")
    elif not float(prior_precision) > 0:
        raise ValueError(f"prior_precision must be > 0 (the precision every state relaxes to); got {prior_precision}.")
    if initial_state is not None:
        shape = (B, H, v.shape[-1], DK)
        if len(initial_state) != 2 or any(tuple(x.shape) != shape for x in initial_state):
            raise ValueError(f"the state must be (mu, I), each [batch, heads, value_dim, key_dim] = {shape}.")
    require_triton_device(q.device, INTERPRETED, "Palimpsa's Triton kernels")


def _prior_per_head(prior_precision, num_heads: int, device) -> torch.Tensor:
    """[H] fp32 prior precision (differentiable when given as a tensor)."""
    if isinstance(prior_precision, torch.Tensor):
        return prior_precision.to(device=device, dtype=torch.float32).reshape(-1).expand(num_heads).contiguous()
    return torch.full((num_heads,), float(prior_precision), device=device, dtype=torch.float32)


def palimpsa_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor,
    prior_precision: float | torch.Tensor = 1.0,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    output_uncertainty: bool = False,
):
    """Chunked Palimpsa scan with autograd (gradients for q, k, v, beta, log_alpha, a tensor prior and the initial
    state). Arguments and return values as `palimpsa.palimpsa_attention`:

    q, k: [B, T, H, K]; v, beta: [B, T, H, V]; log_alpha: [B, T, H]; prior_precision: float or [H] tensor;
    initial_state: (mu, I), each [B, H, V, K] (default mu = 0, I = prior). Returns (o, final_state) or
    (o, final_state, var): o and var [B, T, H, V] in q's dtype, final_state = (mu_T, I_T) in fp32 or None.
    """
    _check_inputs(q, k, v, beta, log_alpha, prior_precision, initial_state)
    B, T, H, DK = q.shape
    scale = DK**-0.5 if scale is None else float(scale)
    prior = _prior_per_head(prior_precision, H, q.device)
    mu0 = precision0 = None
    if initial_state is not None:
        mu0, precision0 = (x.to(torch.float32).contiguous() for x in initial_state)
    needs_grad = torch.is_grad_enabled() and any(
        torch.is_tensor(x) and x.requires_grad for x in (q, k, v, beta, log_alpha, prior_precision, mu0, precision0)
    )
    if 0 < T <= MAX_STEP_TOKENS and not needs_grad:
        # Decoding and short prefills: the fused recurrent kernel, on a copy of the state (the contract returns a
        # new final state; callers that own a cache can call palimpsa_recurrent_step_triton to update it in place).
        shape = (B, H, v.shape[-1], DK)
        mu = mu0.clone() if mu0 is not None else q.new_zeros(shape, dtype=torch.float32)
        precision = precision0.clone() if precision0 is not None else prior[None, :, None, None].expand(shape).clone()
        out = palimpsa_recurrent_step_triton(
            q, k, v, beta, log_alpha, (mu, precision), prior, scale, output_uncertainty
        )
        o, var = out if output_uncertainty else (out, None)
        final_state = (mu, precision) if output_final_state else None
        return (o, final_state, var) if output_uncertainty else (o, final_state)
    if T == 0:  # nothing to scan: the state passes through unchanged
        shape = (B, H, v.shape[-1], DK)
        mu_final = mu0 if mu0 is not None else q.new_zeros(shape, dtype=torch.float32)
        precision_final = precision0 if precision0 is not None else prior[None, :, None, None].expand(shape)
        o = var = q.new_zeros(v.shape)
    else:
        o, mu_final, precision_final, var = _PalimpsaChunkScan.apply(
            q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), log_alpha.contiguous(),
            prior, mu0, precision0, scale, bool(output_uncertainty),
        )  # fmt: skip
    final_state = (mu_final, precision_final) if output_final_state else None
    return (o, final_state, var) if output_uncertainty else (o, final_state)


@triton.jit
def _palimpsa_step_kernel(
    Q, K, V, BETA, LOG_ALPHA, PRIOR, MU, PRECISION, OUT, VAR,
    T, H, DK, DV, scale,
    UNCERTAINTY: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    b = i_bh // H
    h = i_bh % H
    prior = tl.load(PRIOR + h)
    offs_v = i_v * BV + tl.arange(0, BV)
    offs_k = tl.arange(0, BK)
    in_v = offs_v < DV
    in_k = offs_k < DK
    in_state = in_v[:, None] & in_k[None, :]
    state_offs = (i_bh * DV + offs_v[:, None]) * DK + offs_k[None, :]
    precision = tl.load(PRECISION + state_offs, mask=in_state, other=prior)
    m_state = precision * tl.load(MU + state_offs, mask=in_state, other=0.0)
    i_state = precision - prior
    for t in range(T):
        row = (b * T + t) * H + h
        a = tl.exp(tl.load(LOG_ALPHA + row).to(tl.float32))
        k = tl.load(K + row * DK + offs_k, mask=in_k, other=0.0).to(tl.float32)
        q = tl.load(Q + row * DK + offs_k, mask=in_k, other=0.0).to(tl.float32)
        v = tl.load(V + row * DV + offs_v, mask=in_v, other=0.0).to(tl.float32)
        beta = tl.load(BETA + row * DV + offs_v, mask=in_v, other=0.0).to(tl.float32)
        m_state = a * m_state + v[:, None] * k[None, :]
        i_state = a * i_state + beta[:, None] * (k * k)[None, :]
        precision = i_state + prior
        o = scale * tl.sum(m_state / precision * q[None, :], 1)
        tl.store(OUT + row * DV + offs_v, o.to(OUT.dtype.element_ty), mask=in_v)
        if UNCERTAINTY:
            var = tl.sum((q * q)[None, :] / precision, 1)
            tl.store(VAR + row * DV + offs_v, var.to(VAR.dtype.element_ty), mask=in_v)
    precision = i_state + prior
    tl.store(MU + state_offs, m_state / precision, mask=in_state)
    tl.store(PRECISION + state_offs, precision, mask=in_state)


@torch.no_grad()
def palimpsa_recurrent_step_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor],
    prior_precision: float | torch.Tensor = 1.0,
    scale: float | None = None,
    output_uncertainty: bool = False,
):
    """Decode T <= 64 tokens with one fused recurrent kernel, updating `state = (mu, I)` IN PLACE (forward only).

    q, k: [B, T, H, K]; v, beta: [B, T, H, V]; log_alpha: [B, T, H]; state: (mu, I), each a contiguous fp32
    [B, H, V, K] tensor (e.g. the cache's), overwritten with the state after the last token; prior_precision:
    float or [H] tensor. Returns o, or (o, var) with `output_uncertainty`, each [B, T, H, V] in q's dtype.
    """
    _check_inputs(q, k, v, beta, log_alpha, prior_precision, state)
    mu, precision = state
    B, T, H, DK = q.shape
    if T > MAX_STEP_TOKENS:
        raise ValueError(
            f"palimpsa_recurrent_step_triton is for decoding (at most {MAX_STEP_TOKENS} tokens per call); got {T}. "
            "Use palimpsa_attention_triton (the chunked scan) for longer inputs."
        )
    for name, x in (("mu", mu), ("I", precision)):
        if x.dtype != torch.float32 or not x.is_contiguous() or x.device != q.device:
            raise ValueError(f"state {name} must be a contiguous fp32 tensor on {q.device} (it is updated in place).")
    DV = v.shape[-1]
    scale = DK**-0.5 if scale is None else float(scale)
    o = q.new_empty(v.shape)
    var = q.new_empty(v.shape) if output_uncertainty else o
    if T > 0:
        _palimpsa_step_kernel[(triton.cdiv(DV, _STEP_BLOCK_V), B * H)](
            q.contiguous(), k.contiguous(), v.contiguous(), beta.contiguous(), log_alpha.contiguous(),
            _prior_per_head(prior_precision, H, q.device), mu, precision, o, var, T, H, DK, DV, scale,
            UNCERTAINTY=output_uncertainty, BV=_STEP_BLOCK_V, BK=max(triton.next_power_of_2(DK), 2),
            num_warps=_STEP_WARPS,
        )  # fmt: skip
    return (o, var) if output_uncertainty else o


__all__ = ["INTERPRETED", "MAX_STEP_TOKENS", "palimpsa_attention_triton", "palimpsa_recurrent_step_triton"]
