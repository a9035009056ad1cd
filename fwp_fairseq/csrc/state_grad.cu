// Backward pass A: the gradient G of the state, run backwards in time, column by column.
//
// With S_t = S_{t-1} + k_t u_t^T and o_t = S_t^T q_t, and G = dL/dS_t (all later reads included):
//   G += q_t do_t^T;   du_t = G^T k_t;
//   delta rule only (u_t = beta_t (v_t - S_{t-1}^T k_t)):  G += k_t da_t^T, da_t = -beta_t du_t.
// Column j of G needs only column j of G, so the layout is the forward's: one CTA per (head, tile
// of OUT value columns), a column per group of R lanes, one butterfly per step. The final G is
// the gradient of the initial state. dv, dbeta and da follow from du elementwise (in Python).
#include "fwp_api.h"
#include "fwp_launch.cuh"

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
  static constexpr size_t b_off = 2 * k_bytes + d_bytes;
  static constexpr size_t stage_bytes = b_off + b_bytes;
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t smem = 2 * stage_bytes + out_bytes;
};

template <typename scalar_t, int DK, bool DELTA>
__global__ void __launch_bounds__(kThreads) state_grad_kernel(StateGradParams p) {
  using Sh = StateGradShape<scalar_t, DK>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = PT / 4, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);
  const Owner<R> o(p.ntiles, p.Dv);  // owner: column o.own of the state gradient
  const int Dk = p.Dk, Dv = p.Dv, tid = o.tid;
  const long long T = p.T, bh = o.bh;

  const scalar_t* qg = static_cast<const scalar_t*>(p.q) + bh * T * Dk;
  const scalar_t* kg = static_cast<const scalar_t*>(p.k) + bh * T * Dk;
  const scalar_t* dg = static_cast<const scalar_t*>(p.dout) + bh * T * Dv + o.first;
  const acc_t* bg = offset_or_null<acc_t>(p.beta, bh * T);
  auto in = [&](int b, size_t off) { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, off); };
  auto acc_in = [&](int b, size_t off) { return stage_part<acc_t>(smem, Sh::stage_bytes, b, off); };
  acc_t* ubuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes);
  zero_stages(smem, 2 * Sh::stage_bytes, tid);

  // The same inputs as the forward's, in the same places, with dout in place of v.
  auto stage = [&](long long t0, int steps, int b) {
    stage_rows(in(b, 0), DK, kg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(in(b, Sh::k_bytes), DK, qg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(in(b, 2 * Sh::k_bytes), OUT, dg + t0 * Dv, Dv, steps, o.count, tid);
    if constexpr (DELTA) stage_scalars(acc_in(b, Sh::b_off), bg + t0, steps, tid);
  };

  acc_t G[PT];  // column o.own of dL/dS_t
  load_owned(G, offset_or_null<acc_t>(p.dht, bh * Dk * Dv + o.own), Dv, Dk, o);

  chunk_loop<TC, true>(T, stage, [&](long long t0, int steps, int b) {
    const scalar_t* kb = in(b, 0);
    const scalar_t* qb = in(b, Sh::k_bytes);
    const scalar_t* db = in(b, 2 * Sh::k_bytes);
    const acc_t* bb = acc_in(b, Sh::b_off);
    for (int s = steps - 1; s >= 0; --s) {
      const acc_t dj = to_acc(db[s * OUT + o.ol]);
      acc_t kr[PT];
      acc_t part[2] = {};
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        acc_t kk[4], qq[4];
        load4(kb + s * DK + 4 * (o.g + R * m), kk);
        load4(qb + s * DK + 4 * (o.g + R * m), qq);
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
      if (o.g == 0) ubuf[s * OUT + o.ol] = du[0];
    }
    __syncthreads();  // du staged; stage b fully read
    flush_rows<OUT>(static_cast<acc_t*>(p.du) + (bh * T + t0) * Dv + o.first, Dv, ubuf, steps,
                    o.count, tid);
  });

  store_owned(offset_or_null<acc_t>(p.dh0, bh * Dk * Dv + o.own), Dv, Dk, o, G);
}

template <typename scalar_t, int DK, bool DELTA>
const char* launch_state_grad(StateGradParams p, long long BH, void* stream) {
  using Sh = StateGradShape<scalar_t, DK>;
  p.ntiles = (p.Dv + Sh::OUT - 1) / Sh::OUT;
  return launch_tiles(state_grad_kernel<scalar_t, DK, DELTA>, p, BH, Sh::smem, stream);
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
  return dispatch<512>(dtype, Dk, delta, [&](auto tag, auto len, auto dl) {
    return launch_state_grad<typename decltype(tag)::type, decltype(len)::value,
                             decltype(dl)::value>(p, BH, stream);
  });
  FWP_CATCH
}
