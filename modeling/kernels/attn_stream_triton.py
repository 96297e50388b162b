"""AttnStream flash attention in Triton: causal, padding mask, grouped-query, head dims 16-128, fused stream mix.

What it computes (the reference twin is `attn_stream_attention_reference` in `attn_stream.py`, eager attention on the
explicitly mixed tensors):

    x_mixed = w_own[h] * x + w_src[h] * x_src      for the streamed one of x in {q, k, v}, head by head
    o = softmax(scale * q k^T  masked by (bottom-right causal) AND attention_mask) v

The mix happens in registers as each tile is loaded (forward and both backward kernels), so the mixed tensor
never exists in memory; its gradient is split on the fly into d(own) = w_own * d(mixed), d(src) = w_src * d(mixed)
and per-block partial sums of d(w) that the wrapper reduces. Rows whose keys are all masked output zeros (the
flash-attention convention; eager gives the mean of v there, a value no loss should depend on).

Layout: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] (any strides: transformers hands over transposed views), output
[B, Tq, Hq, D] as transformers' attention interface expects; log-sum-exp is kept in fp32 for the backward.
Kernels: forward (one program per query block and head, online softmax), backward in two deterministic
kernels without atomics (dK/dV per key block and key/value head, looping over its query heads; dQ per query block).

Cost per query token and query head, at causal context T (average T/2 keys), head dim D, 2-byte inputs:
    forward  FLOPs  4 * D * T/2 = 2 D T            (q k^T and p v; softmax adds ~5 T/2, negligible)
    backward FLOPs  7 * D * T                      (q k^T recomputed in both kernels, dp twice, dv, dk, dq:
                                                    3.5x the forward; FlashAttention-2's single kernel with
                                                    atomics needs 2.5x, we trade 1 D T for determinism)
    HBM bytes, forward   2 D (q) + 2 D (o) + 4 (lse) + 4 D / G (k, v of its kv head; G = Hq / Hkv)
                          [+ 2 D or 2 D / G for the stream source when a mix is fused]
    HBM bytes, backward  ~ 3x the forward (q, k, v, o, do read; dq, dk, dv written; delta = rowsum(o * do))
    Re-reads of k/v tiles by each query block hit L2 at these sizes.
At T = 2048, D = 128 (the 1B shapes in bench/gpu_kernels.py) that is 524k FLOPs against ~1.3 kB per token-head,
~400 FLOP/byte, well above the ~300 FLOP/byte ridge of an H100 (989 TFLOP/s bf16 dense, 3.35 TB/s):
the kernel is compute-bound, like FlashAttention. The fused mix costs 2 D FLOPs per loaded element (nothing)
and saves writing and re-reading the mixed tensor (4 D bytes per token-head) plus one elementwise kernel.
A padding mask adds BLOCK_M * BLOCK_N bytes per tile (1 byte per score), ~25% of a bf16 k+v tile at D=128.

Testing on CPU: import this module with TRITON_INTERPRET=1 set (before triton is imported); the kernels then
run in Triton's interpreter on CPU tensors with a single config (autotuning needs a GPU driver), fp32 only.
"""

import torch
import triton
import triton.language as tl

from .attn_stream import STREAM_CODES, check_attention_inputs

# @triton.jit decides at decoration time whether it builds an interpreted function: remember which we got.
INTERPRETED = bool(triton.knobs.runtime.interpret)

MIX_Q, MIX_K, MIX_V = 1, 2, 3
_LOG2E = 1.4426950408889634


def _configs(gpu_choices):
    if INTERPRETED:  # one config: the autotuner then never benchmarks (that would need a GPU driver)
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for (m, n, w, s) in gpu_choices]


_FWD_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2)])
_BWD_CONFIGS = _configs([(64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)])
_MIN_BLOCK = 16  # smallest BLOCK_M / BLOCK_N over all configs: sizes the per-block d(w) buffer
_TUNE_KEY = ["HEAD_DIM_PAD", "CAUSAL", "MIX", "HAS_MASK", "GROUPS"]


@triton.jit
def _load_tile(
    ptr,
    src_ptr,
    rows,
    cols,
    row_stride,
    col_stride,
    src_row_stride,
    src_col_stride,
    n_rows,
    n_cols,
    w_own,
    w_src,
    MIXED: tl.constexpr,
):
    """A [rows, cols] tile of x (or of w_own * x + w_src * x_src when MIXED), zero outside the tensor."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(ptr + rows[:, None] * row_stride + cols[None, :] * col_stride, mask=inside, other=0.0)
    if MIXED:
        x_src = tl.load(
            src_ptr + rows[:, None] * src_row_stride + cols[None, :] * src_col_stride, mask=inside, other=0.0
        )
        x = (w_own * x.to(tl.float32) + w_src * x_src.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _score_mask(offs_m, offs_n, T_Q, T_K, mask_ptr, sm_q, sm_k, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):
    """Which (query, key) pairs take part: inside both sequences, causal (bottom-right aligned), mask True."""
    keep = (offs_m[:, None] < T_Q) & (offs_n[None, :] < T_K)
    if CAUSAL:
        keep &= offs_n[None, :] <= offs_m[:, None] + (T_K - T_Q)
    if HAS_MASK:
        allowed = tl.load(mask_ptr + offs_m[:, None] * sm_q + offs_n[None, :] * sm_k, mask=keep, other=0)
        keep &= allowed != 0
    return keep


@triton.autotune(configs=_FWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, SRC, W, MASK, OUT, LSE,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, ss_b, ss_h, ss_t, ss_d,
    sm_b, sm_h, sm_q, sm_k, so_b, so_t, so_h, so_d,
    H_Q, T_Q, T_K, HEAD_DIM, W_HEADS, qk_scale_log2,
    GROUPS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, MIX: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h_q = pid_bh % H_Q
    h_kv = h_q // GROUPS
    h_w = h_q if MIX == 1 else h_kv  # queries are streamed per query head, keys/values per kv head
    w_own = 1.0
    w_src = 0.0
    if MIX != 0:
        w_own = tl.load(W + h_w)
        w_src = tl.load(W + W_HEADS + h_w)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    src_h = h_q if MIX == 1 else h_kv
    src_base = SRC + b * ss_b + src_h * ss_h
    q = _load_tile(Q + b * sq_b + h_q * sq_h, src_base, offs_m, offs_d, sq_t, sq_d, ss_t, ss_d, T_Q, HEAD_DIM,
                   w_own, w_src, MIX == 1)  # fmt: skip
    k_base = K + b * sk_b + h_kv * sk_h
    v_base = V + b * sv_b + h_kv * sv_h
    mask_base = MASK + b * sm_b + h_q * sm_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    hi = T_K
    if CAUSAL:  # key blocks wholly to the right of the diagonal are skipped
        hi = tl.minimum(T_K, (pid_m + 1) * BLOCK_M + (T_K - T_Q))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, src_base, cols, offs_d, sk_t, sk_d, ss_t, ss_d, T_K, HEAD_DIM, w_own, w_src, MIX == 2)
        v = _load_tile(v_base, src_base, cols, offs_d, sv_t, sv_d, ss_t, ss_d, T_K, HEAD_DIM, w_own, w_src, MIX == 3)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2  # log2 units, for exp2
        keep = _score_mask(offs_m, cols, T_Q, T_K, mask_base, sm_q, sm_k, CAUSAL, HAS_MASK)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing to attend to yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))  # exp2(s - inf) = 0 in bwd
    o_ptrs = OUT + b * so_b + h_q * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=(offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + pid_bh * T_Q + offs_m, lse, mask=offs_m < T_Q)


@triton.jit
def _store_mixed_grad(grad, own_ptr, src_ptr, d_own_ptr, d_src_ptr, dw_ptr, rows, cols, row_stride, col_stride,
                      src_row_stride, src_col_stride, n_rows, n_cols, w_own, w_src, W_BLOCKS):  # fmt: skip
    """Split d(mixed) into d(own), d(src) (each laid out like its input) and this block's partial d(w)."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    own_offs = rows[:, None] * row_stride + cols[None, :] * col_stride
    src_offs = rows[:, None] * src_row_stride + cols[None, :] * src_col_stride
    own = tl.load(own_ptr + own_offs, mask=inside, other=0.0)
    src = tl.load(src_ptr + src_offs, mask=inside, other=0.0)
    tl.store(d_own_ptr + own_offs, (w_own * grad).to(d_own_ptr.dtype.element_ty), mask=inside)
    tl.store(d_src_ptr + src_offs, (w_src * grad).to(d_src_ptr.dtype.element_ty), mask=inside)
    tl.store(dw_ptr, tl.sum(tl.sum(grad * own.to(tl.float32), 1), 0))
    tl.store(dw_ptr + W_BLOCKS, tl.sum(tl.sum(grad * src.to(tl.float32), 1), 0))


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, SRC, W, MASK, DO, LSE, DELTA, DK, DV, DSRC, DW,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, ss_b, ss_h, ss_t, ss_d,
    sm_b, sm_h, sm_q, sm_k, sdo_b, sdo_t, sdo_h, sdo_d,
    H_Q, H_KV, T_Q, T_K, HEAD_DIM, W_HEADS, W_BLOCKS, qk_scale_log2, scale,
    GROUPS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, MIX: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key block of one kv head: loops over the GROUPS query heads that read it."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    h_kv = pid_bh % H_KV

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    w_own = 1.0
    w_src = 0.0
    if MIX == 2 or MIX == 3:
        w_own = tl.load(W + h_kv)
        w_src = tl.load(W + W_HEADS + h_kv)
    kv_src_base = SRC + b * ss_b + h_kv * ss_h
    k_base = K + b * sk_b + h_kv * sk_h
    v_base = V + b * sv_b + h_kv * sv_h
    k = _load_tile(k_base, kv_src_base, offs_n, offs_d, sk_t, sk_d, ss_t, ss_d, T_K, HEAD_DIM, w_own, w_src, MIX == 2)
    v = _load_tile(v_base, kv_src_base, offs_n, offs_d, sv_t, sv_d, ss_t, ss_d, T_K, HEAD_DIM, w_own, w_src, MIX == 3)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    lo = 0
    if CAUSAL:  # query blocks wholly above the diagonal never see this key block
        lo = tl.maximum(pid_n * BLOCK_N - (T_K - T_Q), 0) // BLOCK_M * BLOCK_M
    for g in range(GROUPS):
        h_q = h_kv * GROUPS + g
        q_w_own = 1.0
        q_w_src = 0.0
        if MIX == 1:
            q_w_own = tl.load(W + h_q)
            q_w_src = tl.load(W + W_HEADS + h_q)
        q_base = Q + b * sq_b + h_q * sq_h
        q_src_base = SRC + b * ss_b + h_q * ss_h
        do_base = DO + b * sdo_b + h_q * sdo_h
        mask_base = MASK + b * sm_b + h_q * sm_h
        row_base = (b * H_Q + h_q) * T_Q
        for start_m in range(lo, T_Q, BLOCK_M):
            rows = start_m + offs_m
            q = _load_tile(q_base, q_src_base, rows, offs_d, sq_t, sq_d, ss_t, ss_d, T_Q, HEAD_DIM, q_w_own,
                           q_w_src, MIX == 1)  # fmt: skip
            do = _load_tile(do_base, do_base, rows, offs_d, sdo_t, sdo_d, sdo_t, sdo_d, T_Q, HEAD_DIM, 1.0, 0.0,
                            False)  # fmt: skip
            lse = tl.load(LSE + row_base + rows, mask=rows < T_Q, other=float("inf"))
            delta = tl.load(DELTA + row_base + rows, mask=rows < T_Q, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
            keep = _score_mask(rows, offs_n, T_Q, T_K, mask_base, sm_q, sm_k, CAUSAL, HAS_MASK)
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    dk *= scale

    dk_ptrs = DK + b * sk_b + h_kv * sk_h + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d
    dv_ptrs = DV + b * sv_b + h_kv * sv_h + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d
    inside = (offs_n[:, None] < T_K) & (offs_d[None, :] < HEAD_DIM)
    dw_ptr = DW + (b * W_HEADS + h_kv) * 2 * W_BLOCKS + pid_n
    dsrc_base = DSRC + b * ss_b + h_kv * ss_h
    if MIX == 2:
        _store_mixed_grad(dk, k_base, kv_src_base, DK + b * sk_b + h_kv * sk_h, dsrc_base, dw_ptr, offs_n, offs_d,
                          sk_t, sk_d, ss_t, ss_d, T_K, HEAD_DIM, w_own, w_src, W_BLOCKS)  # fmt: skip
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=inside)
    if MIX == 3:
        _store_mixed_grad(dv, v_base, kv_src_base, DV + b * sv_b + h_kv * sv_h, dsrc_base, dw_ptr, offs_n, offs_d,
                          sv_t, sv_d, ss_t, ss_d, T_K, HEAD_DIM, w_own, w_src, W_BLOCKS)  # fmt: skip
    else:
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=inside)


@triton.autotune(configs=_BWD_CONFIGS, key=_TUNE_KEY)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, SRC, W, MASK, DO, LSE, DELTA, DQ, DSRC, DW,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, ss_b, ss_h, ss_t, ss_d,
    sm_b, sm_h, sm_q, sm_k, sdo_b, sdo_t, sdo_h, sdo_d,
    H_Q, T_Q, T_K, HEAD_DIM, W_HEADS, W_BLOCKS, qk_scale_log2, scale,
    GROUPS: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CAUSAL: tl.constexpr, MIX: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dQ of one query block of one query head."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_Q
    h_q = pid_bh % H_Q
    h_kv = h_q // GROUPS
    h_w = h_q if MIX == 1 else h_kv
    w_own = 1.0
    w_src = 0.0
    if MIX != 0:
        w_own = tl.load(W + h_w)
        w_src = tl.load(W + W_HEADS + h_w)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    src_base = SRC + b * ss_b + h_w * ss_h
    q_base = Q + b * sq_b + h_q * sq_h
    q = _load_tile(q_base, src_base, offs_m, offs_d, sq_t, sq_d, ss_t, ss_d, T_Q, HEAD_DIM, w_own, w_src, MIX == 1)
    do_base = DO + b * sdo_b + h_q * sdo_h
    do = _load_tile(do_base, do_base, offs_m, offs_d, sdo_t, sdo_d, sdo_t, sdo_d, T_Q, HEAD_DIM, 1.0, 0.0, False)
    lse = tl.load(LSE + pid_bh * T_Q + offs_m, mask=offs_m < T_Q, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * T_Q + offs_m, mask=offs_m < T_Q, other=0.0)
    k_base = K + b * sk_b + h_kv * sk_h
    v_base = V + b * sv_b + h_kv * sv_h
    mask_base = MASK + b * sm_b + h_q * sm_h

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    hi = T_K
    if CAUSAL:
        hi = tl.minimum(T_K, (pid_m + 1) * BLOCK_M + (T_K - T_Q))
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base, src_base, cols, offs_d, sk_t, sk_d, ss_t, ss_d, T_K, HEAD_DIM, w_own, w_src, MIX == 2)
        v = _load_tile(v_base, src_base, cols, offs_d, sv_t, sv_d, ss_t, ss_d, T_K, HEAD_DIM, w_own, w_src, MIX == 3)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        keep = _score_mask(offs_m, cols, T_Q, T_K, mask_base, sm_q, sm_k, CAUSAL, HAS_MASK)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    dq *= scale

    if MIX == 1:
        dw_ptr = DW + (b * W_HEADS + h_q) * 2 * W_BLOCKS + pid_m
        _store_mixed_grad(dq, q_base, src_base, DQ + b * sq_b + h_q * sq_h, DSRC + b * ss_b + h_q * ss_h, dw_ptr,
                          offs_m, offs_d, sq_t, sq_d, ss_t, ss_d, T_Q, HEAD_DIM, w_own, w_src, W_BLOCKS)  # fmt: skip
    else:
        dq_ptrs = DQ + b * sq_b + h_q * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM))


def _strides4(x: torch.Tensor | None) -> tuple[int, int, int, int]:
    if x is None:
        return (0, 0, 0, 0)
    return tuple(s if n > 1 else 0 for s, n in zip(x.stride(), x.shape))  # size-1 dims broadcast


def _mask_strides(mask: torch.Tensor | None) -> tuple[int, int, int, int]:
    return _strides4(mask)


class _AttnStreamFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, source, weights, mask, scale, causal, mix):
        B, H_Q, T_Q, D = q.shape
        H_KV, T_K = k.shape[1], k.shape[2]
        groups = H_Q // H_KV
        o = torch.empty(B, T_Q, H_Q, D, device=q.device, dtype=q.dtype)
        lse = torch.empty(B, H_Q, T_Q, device=q.device, dtype=torch.float32)
        mask_u8 = mask.view(torch.uint8) if mask is not None else None
        w_heads = weights.shape[1] if weights is not None else 1
        dummy = q  # never read: pointer for absent source / weights / mask
        meta = dict(
            GROUPS=groups,
            HEAD_DIM_PAD=max(16, triton.next_power_of_2(D)),
            CAUSAL=causal,
            MIX=mix,
            HAS_MASK=mask is not None,
            # fp32 inputs keep fp32 products (tf32 would lose ~3 digits); half inputs use the tensor cores as they are
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )

        def grid(META):
            return (triton.cdiv(T_Q, META["BLOCK_M"]), B * H_Q)

        _attn_fwd_kernel[grid](
            q, k, v, source if source is not None else dummy, weights if weights is not None else dummy,
            mask_u8 if mask_u8 is not None else dummy, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *_strides4(source), *_mask_strides(mask_u8), *o.stride(),
            H_Q, T_Q, T_K, D, w_heads, scale * _LOG2E, **meta,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, source, weights, mask_u8, o, lse)
        ctx.scale, ctx.meta = scale, meta
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, source, weights, mask_u8, o, lse = ctx.saved_tensors
        meta, scale = ctx.meta, ctx.scale
        B, H_Q, T_Q, D = q.shape
        H_KV, T_K = k.shape[1], k.shape[2]
        mix = meta["MIX"]
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H_Q, T_Q], rowsum(o * do)
        # Each gradient is written with its input's strides, so it must be a dense tensor of that layout
        # (empty_like keeps the layout of dense tensors: transformers' transposed views qualify).
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if (dq.stride(), dk.stride(), dv.stride()) != (q.stride(), k.stride(), v.stride()):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if source is not None and torch.empty_like(source).stride() != source.stride():
            source = source.contiguous()
        dsource = torch.empty_like(source) if source is not None else None
        w_heads = weights.shape[1] if weights is not None else 1
        w_blocks = triton.cdiv(T_Q if mix == MIX_Q else T_K, _MIN_BLOCK)
        dw_partial = torch.zeros(B, w_heads, 2, w_blocks, device=q.device, dtype=torch.float32)
        dummy = q
        common = (
            q, k, v, source if source is not None else dummy, weights if weights is not None else dummy,
            mask_u8 if mask_u8 is not None else dummy, do, lse, delta,
        )  # fmt: skip
        strides = (*q.stride(), *k.stride(), *v.stride(), *_strides4(source), *_mask_strides(mask_u8), *do.stride())
        d_src = dsource if dsource is not None else dummy

        def grid_kv(META):
            return (triton.cdiv(T_K, META["BLOCK_N"]), B * H_KV)

        _attn_bwd_dkdv_kernel[grid_kv](
            *common, dk, dv, d_src, dw_partial, *strides,
            H_Q, H_KV, T_Q, T_K, D, w_heads, w_blocks, scale * _LOG2E, scale, **meta,
        )  # fmt: skip

        def grid_q(META):
            return (triton.cdiv(T_Q, META["BLOCK_M"]), B * H_Q)

        _attn_bwd_dq_kernel[grid_q](
            *common, dq, d_src, dw_partial, *strides,
            H_Q, T_Q, T_K, D, w_heads, w_blocks, scale * _LOG2E, scale, **meta,
        )  # fmt: skip
        dweights = None
        if weights is not None and ctx.needs_input_grad[4]:
            dweights = dw_partial.sum(dim=(0, 3)).transpose(0, 1).to(weights.dtype)  # [2, heads]
        return dq, dk, dv, dsource, dweights, None, None, None, None


def attn_stream_flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    causal: bool = True,
    stream: str | None = None,
    source_projection: torch.Tensor | None = None,
    stream_weights: torch.Tensor | tuple[float, float] | None = None,
) -> torch.Tensor:
    """Flash attention with the stream mix fused into its loads. Returns [batch, q_len, q_heads, head_dim].

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D] with Hq a multiple of Hkv; attention_mask: bool, broadcastable
    [B, 1|Hq, Tq, Tk], True = attend (combined with the causal mask when `causal`, bottom-right aligned so a
    query block at the end of a cache sees every cached key). `stream` names which of q/k/v is
    `w_own * x + w_src * source_projection` (same shape as x); `stream_weights` is a [2, heads] tensor (row 0: own,
    row 1: source; heads = Hq for queries, Hkv for keys/values; gradients flow) or a fixed (w_own, w_src) pair.
    """
    check_attention_inputs(q, k, v, attention_mask, stream, source_projection, stream_weights)
    mix = STREAM_CODES[stream]
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    weights = None
    if mix:
        heads = q.shape[1] if mix == MIX_Q else k.shape[1]
        if isinstance(stream_weights, torch.Tensor):
            if stream_weights.shape != (2, heads):
                raise ValueError(f"stream_weights must be [2, {heads}], got {tuple(stream_weights.shape)}.")
            weights = stream_weights.to(device=q.device, dtype=torch.float32)
        else:
            w_own, w_src = stream_weights
            weights = torch.tensor([[float(w_own)] * heads, [float(w_src)] * heads], device=q.device)
        weights = weights.contiguous()
    if q.shape[2] == 0:
        return q.new_zeros(q.shape[0], 0, q.shape[1], q.shape[3])
    return _AttnStreamFlashAttention.apply(q, k, v, source_projection, weights, attention_mask, scale, causal, mix)


__all__ = ["INTERPRETED", "attn_stream_flash_attention"]
