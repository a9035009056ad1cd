// Backward pass A: the gradient G of the state, run backwards in time, column by column.
//
// With S_t = S_{t-1} + k_t u_t^T and o_t = S_t^T q_t, and G = dL/dS_t (all later reads included):
//   G += q_t do_t^T;   du_t = G^T k_t;
//   delta rule only (u_t = beta_t (v_t - S_{t-1}^T k_t)):  G += k_t da_t^T, da_t = -beta_t du_t.
// Column j of G needs only column j of G, so the layout is the forward's: one CTA per (head, tile
// of OUT value columns), a column per group of R lanes, one butterfly per step. The final G is
// the gradient of the initial state. dv, dbeta and da follow from du elementwise (in Python).
#include "fwp_api.h"
#include "fwp_common.cuh"

namespace fwp {
namespace {

struct StateGradParams {
  const void* q;
  const void* k;
  const void* dout;
  const void* beta;  // acc_t, delta rule only
  const void* dht;   // acc_t or nullptr (no gradient on the final state)
  void* du;          // acc_t (BH, T, Dv)
  void* dh0;         // acc_t or nullptr
  long long T;
  int Dk, Dv, ntiles;
};

template <typename scalar_t, int DK>
struct StateGradShape {
  using acc_t = typename Acc<scalar_t>::type;
  static constexpr int R = Split<DK>::R, PT = Split<DK>::PT, OUT = kThreads / R;
  static constexpr int TC = chunk_steps(2 * DK * int(sizeof(scalar_t)));
  static constexpr size_t k_bytes = align16(size_t(TC) * DK * sizeof(scalar_t));
  static constexpr size_t d_bytes = align16(size_t(TC) * OUT * sizeof(scalar_t));
  static constexpr size_t b_bytes = align16(size_t(TC) * sizeof(acc_t));
  static constexpr size_t stage_bytes = 2 * k_bytes + d_bytes + b_bytes;
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t smem = 2 * stage_bytes + out_bytes;
};

template <typename scalar_t, int DK, bool DELTA>
__global__ void __launch_bounds__(kThreads) state_grad_kernel(StateGradParams p) {
  using Sh = StateGradShape<scalar_t, DK>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = PT / 4, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);

  const int tid = threadIdx.x, g = tid % R, ol = tid / R;
  const long long bh = blockIdx.x / p.ntiles;
  const int col0 = (blockIdx.x % p.ntiles) * OUT;
  const int Dk = p.Dk, Dv = p.Dv;
  const long long T = p.T;
  const int ncols = imin(OUT, Dv - col0);
  const bool col_ok = ol < ncols;
  const int j = col0 + ol;

  const scalar_t* qg = static_cast<const scalar_t*>(p.q) + bh * T * Dk;
  const scalar_t* kg = static_cast<const scalar_t*>(p.k) + bh * T * Dk;
  const scalar_t* dg = static_cast<const scalar_t*>(p.dout) + bh * T * Dv + col0;
  const acc_t* bg = DELTA ? static_cast<const acc_t*>(p.beta) + bh * T : nullptr;

  auto kbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes); };
  auto qbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes + Sh::k_bytes); };
  auto dbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes + 2 * Sh::k_bytes); };
  auto bbuf = [&](int b) {
    return reinterpret_cast<acc_t*>(smem + b * Sh::stage_bytes + 2 * Sh::k_bytes + Sh::d_bytes);
  };
  acc_t* ubuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes);

  for (size_t x = tid; x < 2 * Sh::stage_bytes / 4; x += kThreads)
    reinterpret_cast<uint32_t*>(smem)[x] = 0u;
  __syncthreads();

  auto stage = [&](long long c, int b) {
    const long long t0 = c * TC;
    const int steps = static_cast<int>(lmin(TC, T - t0));
    stage_rows(kbuf(b), DK, kg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(qbuf(b), DK, qg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(dbuf(b), OUT, dg + t0 * Dv, Dv, steps, ncols, tid);
    if constexpr (DELTA) stage_scalars(bbuf(b), bg + t0, steps, tid);
    copy_commit();
  };

  acc_t G[PT];
#pragma unroll
  for (int m = 0; m < NV; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = 4 * (g + R * m) + e;
      G[4 * m + e] = (p.dht && col_ok && row < Dk)
                         ? static_cast<const acc_t*>(p.dht)[(bh * Dk + row) * Dv + j]
                         : acc_t(0);
    }

  const long long nchunks = (T + TC - 1) / TC;
  stage(nchunks - 1, static_cast<int>((nchunks - 1) & 1));
  for (long long c = nchunks - 1; c >= 0; --c) {
    const int b = static_cast<int>(c & 1);
    if (c > 0) {
      stage(c - 1, b ^ 1);
      copy_wait_but_one();
    } else {
      copy_wait_all();
    }
    __syncthreads();

    const long long t0 = c * TC;
    const int steps = static_cast<int>(lmin(TC, T - t0));
    const scalar_t* kb = kbuf(b);
    const scalar_t* qb = qbuf(b);
    const scalar_t* db = dbuf(b);
    const acc_t* bb = bbuf(b);
    for (int s = steps - 1; s >= 0; --s) {
      const acc_t dj = to_acc(db[s * OUT + ol]);
      acc_t kr[PT];
      acc_t part[2] = {};
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        acc_t kk[4], qq[4];
        load4(kb + s * DK + 4 * (g + R * m), kk);
        load4(qb + s * DK + 4 * (g + R * m), qq);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          kr[4 * m + e] = kk[e];
          G[4 * m + e] += qq[e] * dj;  // the read o_t = S_t^T q_t
          part[m & 1] += kk[e] * G[4 * m + e];
        }
      }
      acc_t du[1] = {part[0] + part[1]};
      group_sum<R>(du);
      if constexpr (DELTA) {
        const acc_t da = -bb[s] * du[0];  // through v_bar_t = S_{t-1}^T k_t
#pragma unroll
        for (int x = 0; x < PT; ++x) G[x] += kr[x] * da;
      }
      if (g == 0) ubuf[s * OUT + ol] = du[0];
    }
    __syncthreads();  // du staged; stage b fully read

    acc_t* ug = static_cast<acc_t*>(p.du) + (bh * T + t0) * Dv + col0;
    for (int x = tid; x < steps * ncols; x += kThreads) {
      const int s = x / ncols, cc = x - s * ncols;
      ug[s * Dv + cc] = ubuf[s * OUT + cc];
    }
  }

  if (p.dh0 && col_ok) {
    acc_t* dh0 = static_cast<acc_t*>(p.dh0) + bh * Dk * Dv + j;
#pragma unroll
    for (int m = 0; m < NV; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = 4 * (g + R * m) + e;
        if (row < Dk) dh0[row * Dv] = G[4 * m + e];
      }
  }
}

template <typename scalar_t, int DK, bool DELTA>
const char* launch_state_grad(StateGradParams p, long long BH, void* stream) {
  using Sh = StateGradShape<scalar_t, DK>;
  p.ntiles = (p.Dv + Sh::OUT - 1) / Sh::OUT;
  auto kernel = state_grad_kernel<scalar_t, DK, DELTA>;
  if (BH * p.ntiles > 2147483647LL) return "fwp: more (head, tile) blocks than one grid holds";
  if (const char* e = prepare_launch(kernel, Sh::smem)) return e;
  FWP_LAUNCH(kernel, BH * p.ntiles, Sh::smem, stream, p);
  return launch_error();
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_state_grad(int dtype, int delta, const void* q, const void* k,
                                      const void* dout, const void* beta, const void* dht,
                                      void* du, void* dh0, long long BH, long long T, int Dk,
                                      int Dv, void* stream) {
  using namespace fwp;
  FWP_TRY
  if (const char* e = check_sizes(BH, T, Dk, Dv, 64)) return e;
  if (delta && !beta) return "fwp: the delta rule needs beta";
  StateGradParams p{q, k, dout, beta, dht, du, dh0, T, Dk, Dv, 0};
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return dispatch_len<512>(Dk, [&](auto len) {
      constexpr int DK = decltype(len)::value;
      return delta ? launch_state_grad<scalar_t, DK, true>(p, BH, stream)
                   : launch_state_grad<scalar_t, DK, false>(p, BH, stream);
    });
  });
  FWP_CATCH
}
