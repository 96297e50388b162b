// Palimpsa on CPU as one fused token loop per (batch, head): the fast path for small states on CPU.
//
// The recurrence (palimpsa.py), with the numerator M = I * mu and the excess precision E = I - Ip:
//
//     M_t = a_t M_{t-1} + v_t k_t^T,   E_t = a_t E_{t-1} + beta_t (k_t^2)^T,   mu_t = M_t / (E_t + Ip),
//     o_t = scale mu_t q_t,            var_t = (q_t^2)^T / (E_t + Ip)  (rows: sum over K)
//
// The PyTorch chunked path (palimpsa_chunk.py) sweeps [B*H, chunks, V, K] tensors once per elementwise op; here
// one (batch, head) keeps its [2, V, K] state in cache and every token does all its work in one pass over it.
//
// Backward: the forward keeps the state at every `chunk`-th token. For each chunk, last first, the states inside
// it are recomputed (chunk + 1 states in a per-thread buffer) and the adjoint A = (dL/dM_t, dL/dE_t) runs back:
//
//     A_t = a_{t+1} A_{t+1} + (G_t, H_t),   G_t = scale do_t (q_t / I_t)^T,
//     H_t = -G_t * mu_t - dvar_t (q_t^2 / I_t^2)^T                                  (direct terms, elementwise)
//     dv_t = A^M_t k_t,   dbeta_t = A^E_t k_t^2,   dk_t = A^M_t^T v_t + 2 k_t * (A^E_t^T beta_t),
//     dq_t = scale mu_t^T do_t + 2 q_t * ((1 / I_t)^T dvar_t),
//     dlog_alpha_t = a_t <A_t, S_{t-1}>,   dIp = sum_t sum(H_t)   (E does not depend on Ip given E_0),
//
// and A_0 = a_1 A_1 is the adjoint of the initial state. Inputs: [B, T, H, X] contiguous, float32 or float64. An
// empty `beta` turns metaplasticity off: beta = 0 and E_0 = 0, so E stays 0, I = Ip, and only M is computed (gated
// linear attention divided by Ip).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

struct Strides {
  int64_t B, T, H, K, V;
  int64_t key(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * K; }
  int64_t value(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * V; }
  int64_t gate(int64_t b, int64_t t, int64_t h) const { return (b * T + t) * H + h; }
};

// The state is stored transposed, S = (M^T, E^T) as [2, K, V]: the inner loops then run along V, where each
// output element has its own lane, with no sums across lanes (one per key row in the backward, none forward).

// One token's state update S = a S_prev + (k v^T, k^2 beta^T), in [2, K, V] layout. Without metaplasticity
// (beta = 0 and E_0 = 0, so E stays 0 and I = Ip) only M moves; E is neither read nor written.
template <typename scalar_t, bool metaplastic>
inline void step(const scalar_t* S_prev, scalar_t* S, const scalar_t* k, const scalar_t* v, const scalar_t* beta,
                 scalar_t a, int64_t V, int64_t K) {
  const int64_t VK = V * K;
  for (int64_t j = 0; j < K; ++j) {
    const scalar_t kj = k[j], kk = k[j] * k[j];
    const scalar_t *Mp = S_prev + j * V, *Ep = S_prev + VK + j * V;
    scalar_t *M = S + j * V, *E = S + VK + j * V;
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      M[i] = a * Mp[i] + v[i] * kj;
      if constexpr (metaplastic) E[i] = a * Ep[i] + beta[i] * kk;
    }
  }
}

template <typename scalar_t, bool metaplastic>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                    const at::Tensor& log_alpha, const at::Tensor& prior, const at::Tensor& initial, double scale_,
                    int64_t chunk, at::Tensor& o, at::Tensor& var, at::Tensor& starts, at::Tensor& final) {
  const Strides s{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  const int64_t V = s.V, K = s.K, VK = V * K, num_chunks = starts.size(1);
  const bool want_var = var.numel() > 0;
  const scalar_t scale = static_cast<scalar_t>(scale_);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  const scalar_t *bp = metaplastic ? beta.data_ptr<scalar_t>() : nullptr, *lp = log_alpha.data_ptr<scalar_t>();
  const scalar_t *pp = prior.data_ptr<scalar_t>(), *ip = initial.data_ptr<scalar_t>();
  scalar_t *op = o.data_ptr<scalar_t>(), *varp = want_var ? var.data_ptr<scalar_t>() : nullptr;
  scalar_t *sp = starts.data_ptr<scalar_t>(), *fp = final.data_ptr<scalar_t>();

  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> out(V), variance(V);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const scalar_t p = pp[bh], inv_p = scalar_t(1) / p;
      scalar_t* M = fp + bh * 2 * VK;  // the state lives in `final`; it is final after the last token
      scalar_t* E = M + VK;
      std::copy(ip + bh * 2 * VK, ip + (bh + 1) * 2 * VK, M);
      for (int64_t t = 0; t < s.T; ++t) {
        if (t % chunk == 0) std::copy(M, M + 2 * VK, sp + (bh * num_chunks + t / chunk) * 2 * VK);
        const scalar_t* q_t = qp + s.key(b, t, h);
        const scalar_t* k_t = kp + s.key(b, t, h);
        const scalar_t* v_t = vp + s.value(b, t, h);
        const scalar_t* beta_t = metaplastic ? bp + s.value(b, t, h) : nullptr;
        const scalar_t a = std::exp(lp[s.gate(b, t, h)]);
        scalar_t *o_acc = out.data(), *var_acc = variance.data();
        std::fill(out.begin(), out.end(), scalar_t(0));
        std::fill(variance.begin(), variance.end(), scalar_t(0));
        for (int64_t j = 0; j < K; ++j) {  // the update and the readout in one pass over the state
          scalar_t* Mj = M + j * V;
          scalar_t* Ej = E + j * V;
          const scalar_t kj = k_t[j], kk = k_t[j] * k_t[j], qj = q_t[j], qq = q_t[j] * q_t[j];
#pragma omp simd
          for (int64_t i = 0; i < V; ++i) {
            Mj[i] = a * Mj[i] + v_t[i] * kj;
            if constexpr (metaplastic) Ej[i] = a * Ej[i] + beta_t[i] * kk;
            const scalar_t r = metaplastic ? scalar_t(1) / (Ej[i] + p) : inv_p;
            o_acc[i] += Mj[i] * r * qj;
            var_acc[i] += qq * r;
          }
        }
        scalar_t* o_t = op + s.value(b, t, h);
        for (int64_t i = 0; i < V; ++i) o_t[i] = scale * o_acc[i];
        if (want_var) std::copy(variance.begin(), variance.end(), varp + s.value(b, t, h));
      }
    }
  });
}

template <typename scalar_t, bool metaplastic>
void backward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                     const at::Tensor& log_alpha, const at::Tensor& prior, const at::Tensor& starts,
                     const at::Tensor& d_o, const at::Tensor& d_var, const at::Tensor& d_final, double scale_,
                     int64_t chunk, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dbeta,
                     at::Tensor& dlog_alpha, at::Tensor& dprior, at::Tensor& d_initial) {
  const Strides s{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3)};
  const int64_t V = s.V, K = s.K, VK = V * K, num_chunks = starts.size(1);
  const bool with_var = d_var.numel() > 0;
  const scalar_t scale = static_cast<scalar_t>(scale_);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
  const scalar_t *bp = metaplastic ? beta.data_ptr<scalar_t>() : nullptr, *lp = log_alpha.data_ptr<scalar_t>();
  const scalar_t *pp = prior.data_ptr<scalar_t>(), *sp = starts.data_ptr<scalar_t>();
  const scalar_t *dop = d_o.data_ptr<scalar_t>(), *dvarp = with_var ? d_var.data_ptr<scalar_t>() : nullptr;
  const scalar_t* dfp = d_final.data_ptr<scalar_t>();
  scalar_t *dqp = dq.data_ptr<scalar_t>(), *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
  scalar_t *dbp = metaplastic ? dbeta.data_ptr<scalar_t>() : nullptr, *dlp = dlog_alpha.data_ptr<scalar_t>();
  scalar_t *dpp = dprior.data_ptr<scalar_t>(), *dip = d_initial.data_ptr<scalar_t>();

  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> states((chunk + 1) * 2 * VK);  // S_{t0 - 1} .. S_{t0 + chunk - 1} of one chunk
    // Per-lane (V) accumulators of one token: dv, dbeta, the two sums reduced at the end, and scale * do, dvar.
    std::vector<scalar_t> lanes(6 * V);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.H, h = bh % s.H;
      const scalar_t p = pp[bh], inv_p = scalar_t(1) / p;
      scalar_t* AM = dip + bh * 2 * VK;  // the adjoint lives in `d_initial`; it is that after the first token
      scalar_t* AE = AM + VK;
      std::copy(dfp + bh * 2 * VK, dfp + (bh + 1) * 2 * VK, AM);
      scalar_t prior_grad = 0;
      for (int64_t c = num_chunks - 1; c >= 0; --c) {
        const int64_t t0 = c * chunk, n = std::min(chunk, s.T - t0);
        std::copy(sp + (bh * num_chunks + c) * 2 * VK, sp + (bh * num_chunks + c + 1) * 2 * VK, states.data());
        for (int64_t i = 1; i <= n; ++i) {
          const int64_t t = t0 + i - 1;
          step<scalar_t, metaplastic>(states.data() + (i - 1) * 2 * VK, states.data() + i * 2 * VK,
                                      kp + s.key(b, t, h), vp + s.value(b, t, h),
                                      metaplastic ? bp + s.value(b, t, h) : nullptr, std::exp(lp[s.gate(b, t, h)]), V,
                                      K);
        }
        for (int64_t n_t = n; n_t >= 1; --n_t) {
          const int64_t t = t0 + n_t - 1;
          const scalar_t* M = states.data() + n_t * 2 * VK;
          const scalar_t* E = M + VK;
          const scalar_t* M_prev = M - 2 * VK;
          const scalar_t* E_prev = M_prev + VK;
          const scalar_t* q_t = qp + s.key(b, t, h);
          const scalar_t* k_t = kp + s.key(b, t, h);
          const scalar_t* v_t = vp + s.value(b, t, h);
          const scalar_t* beta_t = metaplastic ? bp + s.value(b, t, h) : nullptr;
          const scalar_t a = std::exp(lp[s.gate(b, t, h)]);
          scalar_t *dv_acc = lanes.data(), *dbeta_acc = dv_acc + V, *decay_acc = dbeta_acc + V;
          scalar_t *prior_acc = decay_acc + V, *g = prior_acc + V, *dvar = g + V;
          std::fill(lanes.begin(), lanes.begin() + 4 * V, scalar_t(0));
          for (int64_t i = 0; i < V; ++i) {
            g[i] = scale * dop[s.value(b, t, h) + i];
            dvar[i] = with_var ? dvarp[s.value(b, t, h) + i] : scalar_t(0);
          }
          for (int64_t j = 0; j < K; ++j) {
            scalar_t* AMj = AM + j * V;
            scalar_t* AEj = AE + j * V;
            const scalar_t *Mj = M + j * V, *Ej = E + j * V, *Mpj = M_prev + j * V, *Epj = E_prev + j * V;
            const scalar_t qj = q_t[j], qq = q_t[j] * q_t[j], kj = k_t[j], kk = k_t[j] * k_t[j];
            scalar_t dq_j = 0, dk_j = 0;
#pragma omp simd reduction(+ : dq_j, dk_j)
            for (int64_t i = 0; i < V; ++i) {
              const scalar_t inv = metaplastic ? scalar_t(1) / (Ej[i] + p) : inv_p;
              const scalar_t mu = Mj[i] * inv;
              const scalar_t G = g[i] * qj * inv;
              const scalar_t Hd = -G * mu - dvar[i] * qq * inv * inv;
              const scalar_t am = AMj[i] + G;
              dq_j += g[i] * mu + 2 * qj * dvar[i] * inv;
              dv_acc[i] += am * kj;
              prior_acc[i] += Hd;
              AMj[i] = a * am;
              if constexpr (metaplastic) {
                const scalar_t ae = AEj[i] + Hd;
                dk_j += am * v_t[i] + 2 * kj * ae * beta_t[i];
                dbeta_acc[i] += ae * kk;
                decay_acc[i] += am * Mpj[i] + ae * Epj[i];
                AEj[i] = a * ae;
              } else {
                dk_j += am * v_t[i];
                decay_acc[i] += am * Mpj[i];
              }
            }
            dqp[s.key(b, t, h) + j] = dq_j;
            dkp[s.key(b, t, h) + j] = dk_j;
          }
          scalar_t decay_grad = 0;
          for (int64_t i = 0; i < V; ++i) {
            decay_grad += decay_acc[i];
            prior_grad += prior_acc[i];
          }
          std::copy(dv_acc, dv_acc + V, dvp + s.value(b, t, h));
          if constexpr (metaplastic) std::copy(dbeta_acc, dbeta_acc + V, dbp + s.value(b, t, h));
          dlp[s.gate(b, t, h)] = a * decay_grad;
        }
      }
      dpp[bh] = prior_grad;
    }
  });
}

// The layer's short convolution (depthwise, causal, linear; the caller applies SiLU):
// z[b, t, c] = bias[c] + sum_i w[i, c] x[b, t + i, c] over the W taps, where x = [previous W - 1 inputs, the T new
// ones] ([B, T + W - 1, C], channels last) and w is [W, C]. Every loop runs along the channels. The backward writes,
// per batch row, dx (a gather over the taps) and that row's share of dw and dbias, which the caller sums over the
// batch (no two threads write the same memory).
template <typename scalar_t>
void conv_forward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& z) {
  const int64_t B = z.size(0), T = z.size(1), C = z.size(2), W = weight.size(0);
  const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>();
  const scalar_t* bp = bias.numel() ? bias.data_ptr<scalar_t>() : nullptr;
  scalar_t* zp = z.data_ptr<scalar_t>();
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const scalar_t* xr = xp + (b * (T + W - 1) + t) * C;
      scalar_t* zr = zp + bt * C;
      if (bp)
        std::copy(bp, bp + C, zr);
      else
        std::fill(zr, zr + C, scalar_t(0));
      for (int64_t i = 0; i < W; ++i) {
        const scalar_t *xi = xr + i * C, *wi = wp + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) zr[c] += wi[c] * xi[c];
      }
    }
  });
}

template <typename scalar_t>
void conv_backward_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& d_z, at::Tensor& d_x,
                          at::Tensor& d_weight_rows, at::Tensor& d_bias_rows) {
  const int64_t B = d_z.size(0), T = d_z.size(1), C = d_z.size(2), W = weight.size(0);
  const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = weight.data_ptr<scalar_t>(), *gp = d_z.data_ptr<scalar_t>();
  scalar_t *dxp = d_x.data_ptr<scalar_t>(), *dwp = d_weight_rows.data_ptr<scalar_t>();
  scalar_t* dbp = d_bias_rows.data_ptr<scalar_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* xb = xp + b * (T + W - 1) * C;
      const scalar_t* gb = gp + b * T * C;
      scalar_t *dw = dwp + b * W * C, *db = dbp + b * C, *dxb = dxp + b * (T + W - 1) * C;
      std::fill(dw, dw + W * C, scalar_t(0));
      std::fill(db, db + C, scalar_t(0));
      for (int64_t s = 0; s < T + W - 1; ++s) {  // input row s fed outputs t = s - i, i over the taps
        scalar_t* dxr = dxb + s * C;
        const scalar_t* xr = xb + s * C;
        std::fill(dxr, dxr + C, scalar_t(0));
        for (int64_t i = std::max<int64_t>(0, s - T + 1); i <= std::min(s, W - 1); ++i) {
          const scalar_t *gr = gb + (s - i) * C, *wi = wp + i * C;
          scalar_t* dwi = dw + i * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            dxr[c] += wi[c] * gr[c];
            dwi[c] += gr[c] * xr[c];
          }
        }
        if (s < T) {
          const scalar_t* gr = gb + s * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) db[c] += gr[c];
        }
      }
    }
  });
}

// How many threads one parallel_for over `n` items ran on: torch.get_num_threads() (at most n) in a build with
// OpenMP; 1 in a build without it, where ATen's parallel_for compiles to a plain serial call.
int64_t parallel_threads(int64_t n) {
  std::atomic<int64_t> threads{1};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int64_t seen = at::get_thread_num() + 1;
    int64_t known = threads.load();
    while (known < seen && !threads.compare_exchange_weak(known, seen)) {
    }
  });
  return threads.load();
}

void check(const at::Tensor& x, const char* name, const at::Tensor& like) {
  TORCH_CHECK(x.device().is_cpu(), "palimpsa_cpu: `", name, "` must be on the CPU");
  TORCH_CHECK(x.is_contiguous(), "palimpsa_cpu: `", name, "` must be contiguous");
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "palimpsa_cpu: `", name, "` must have dtype ", like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> palimpsa_cpu_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
    const at::Tensor& log_alpha, const at::Tensor& prior, const at::Tensor& initial, double scale, bool want_var,
    int64_t chunk) {
  for (auto [x, name] : {std::pair{q, "q"}, {k, "k"}, {v, "v"}, {beta, "beta"}, {log_alpha, "log_alpha"},
                         {prior, "prior"}, {initial, "initial"}})
    check(x, name, q);
  TORCH_CHECK(chunk > 0, "palimpsa_cpu: chunk must be positive");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  const int64_t num_chunks = std::max<int64_t>(1, (T + chunk - 1) / chunk);
  auto o = at::empty({B, T, H, V}, q.options());
  auto var = want_var ? at::empty({B, T, H, V}, q.options()) : at::empty({0}, q.options());
  auto starts = at::empty({B * H, num_chunks, 2, K, V}, q.options());
  auto final = at::empty({B * H, 2, K, V}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "palimpsa_cpu_forward", [&] {
    if (beta.numel() > 0)
      forward_kernel<scalar_t, true>(q, k, v, beta, log_alpha, prior, initial, scale, chunk, o, var, starts, final);
    else
      forward_kernel<scalar_t, false>(q, k, v, beta, log_alpha, prior, initial, scale, chunk, o, var, starts, final);
  });
  return {o, var, starts, final};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> palimpsa_cpu_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
    const at::Tensor& log_alpha, const at::Tensor& prior, const at::Tensor& starts, const at::Tensor& d_o,
    const at::Tensor& d_var, const at::Tensor& d_final, double scale, int64_t chunk) {
  for (auto [x, name] : {std::pair{q, "q"}, {k, "k"}, {v, "v"}, {beta, "beta"}, {log_alpha, "log_alpha"},
                         {prior, "prior"}, {starts, "starts"}, {d_o, "d_o"}, {d_var, "d_var"}, {d_final, "d_final"}})
    check(x, name, q);
  auto dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v), dbeta = at::empty_like(beta);
  auto dlog_alpha = at::empty_like(log_alpha), dprior = at::empty_like(prior), d_initial = at::empty_like(d_final);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "palimpsa_cpu_backward", [&] {
    if (beta.numel() > 0)
      backward_kernel<scalar_t, true>(q, k, v, beta, log_alpha, prior, starts, d_o, d_var, d_final, scale, chunk,
                                      dq, dk, dv, dbeta, dlog_alpha, dprior, d_initial);
    else
      backward_kernel<scalar_t, false>(q, k, v, beta, log_alpha, prior, starts, d_o, d_var, d_final, scale, chunk,
                                       dq, dk, dv, dbeta, dlog_alpha, dprior, d_initial);
  });
  return {dq, dk, dv, dbeta, dlog_alpha, dprior, d_initial};
}

at::Tensor causal_conv_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  for (auto [t, name] : {std::pair{x, "x"}, {weight, "weight"}, {bias, "bias"}}) check(t, name, x);
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2 && weight.size(1) == x.size(2) && x.size(1) >= weight.size(0),
              "causal_conv: x must be [B, T + W - 1, C] and weight [W, C]");
  auto z = at::empty({x.size(0), x.size(1) - weight.size(0) + 1, x.size(2)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_forward",
                             [&] { conv_forward_kernel<scalar_t>(x, weight, bias, z); });
  return z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_conv_backward(const at::Tensor& x, const at::Tensor& weight,
                                                                    const at::Tensor& d_z) {
  for (auto [t, name] : {std::pair{x, "x"}, {weight, "weight"}, {d_z, "d_z"}}) check(t, name, x);
  auto d_x = at::empty_like(x);
  auto d_weight_rows = at::empty({x.size(0), weight.size(0), weight.size(1)}, x.options());
  auto d_bias_rows = at::empty({x.size(0), weight.size(1)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "causal_conv_backward", [&] {
    conv_backward_kernel<scalar_t>(x, weight, d_z, d_x, d_weight_rows, d_bias_rows);
  });
  return {d_x, d_weight_rows.sum(0), d_bias_rows.sum(0)};
}

}  // namespace

TORCH_LIBRARY(amformers_palimpsa_cpu, m) {
  m.def("forward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor log_alpha, Tensor prior, Tensor initial, "
        "float scale, bool want_var, int chunk) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("backward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor log_alpha, Tensor prior, Tensor starts, "
        "Tensor d_o, Tensor d_var, Tensor d_final, float scale, int chunk) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("causal_conv_forward(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("causal_conv_backward(Tensor x, Tensor weight, Tensor d_z) -> (Tensor, Tensor, Tensor)");
  m.def("parallel_threads(int n) -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(amformers_palimpsa_cpu, CPU, m) {
  m.impl("forward", &palimpsa_cpu_forward);
  m.impl("backward", &palimpsa_cpu_backward);
  m.impl("causal_conv_forward", &causal_conv_forward);
  m.impl("causal_conv_backward", &causal_conv_backward);
}
