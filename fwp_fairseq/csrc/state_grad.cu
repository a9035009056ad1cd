// Backward pass A: the gradient G of the state, run backwards in time, column by column.
//
// With S'_t = a_t S_{t-1} (a_t = 1 without the forget gate), S_t = S'_t + k_t u_t^T,
// o_t = S_t^T q_t and G = dL/dS_t (all later reads included):
//   G += q_t do_t^T;   du_t = G^T k_t;
//   delta rule only (u_t = beta_t (v_t - S'^T_t k_t)):  G += k_t da_t^T, da_t = -beta_t du_t;
//   G = a_t G  (now dL/dS_{t-1}).
// Column j of G needs only column j of G, so the layout is the forward's (fwp_columns.cuh), with
// do_t in place of v_t. The final G is the gradient of the initial state. dv, dbeta and da follow
// from du elementwise (in Python).
#include "fwp_api.h"
#include "fwp_columns.cuh"
#include "fwp_launch.cuh"

namespace fwp {
namespace {

struct StateGradParams {
  const void* q;
  const void* k;
  const void* dout;
  const void* beta;  // acc_t, delta rule only
  const void* a;     // acc_t forget gate, or nullptr
  const void* dht;   // acc_t or nullptr (no gradient on the final state)
  void* du;          // acc_t (BH, T, Dv)
  void* dh0;         // acc_t or nullptr
  long long T;
  int Dk, Dv, ntiles;
};

template <typename scalar_t, int DK, bool DELTA, bool GATED>
__global__ void __launch_bounds__(kThreads) state_grad_kernel(StateGradParams p) {
  using Sh = ColumnShape<scalar_t, DK, 1>;
  using acc_t = typename Sh::acc_t;
  constexpr int R = Sh::R, PT = Sh::PT, NV = Sh::NV, OUT = Sh::OUT, TC = Sh::TC;
  FWP_DECLARE_SMEM(smem);
  const Owner<R> o(p.ntiles, p.Dv);  // owner: column o.own of the state gradient
  const int Dk = p.Dk, Dv = p.Dv;
  const long long T = p.T, head = o.bh * Dk * Dv + o.own;
  const auto in = column_inputs<Sh>(smem, o, p.k, p.q, p.dout, DELTA ? p.beta : nullptr,
                                    GATED ? p.a : nullptr, T, Dk, Dv);

  acc_t G[PT];  // column o.own of dL/dS_t
  load_owned(G, offset_or_null<acc_t>(p.dht, head), Dv, Dk, o);

  chunk_loop<TC, true>(T, in, [&](long long t0, int steps, int b) {
    const scalar_t *kb = in.k(b), *qb = in.q(b), *db = in.x(b);
    const acc_t *bb = in.beta(b), *ab = in.a(b);
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
        const acc_t da = -bb[s] * du[0];  // through the read S'^T_t k_t
#pragma unroll
        for (int x = 0; x < PT; ++x) G[x] += kr[x] * da;
      }
      if constexpr (GATED) {
#pragma unroll
        for (int x = 0; x < PT; ++x) G[x] *= ab[s];
      }
      if (o.g == 0) in.out(0)[s * OUT + o.ol] = du[0];
    }
    __syncthreads();  // du staged; stage b fully read
    flush_rows<OUT>(static_cast<acc_t*>(p.du) + (o.bh * T + t0) * Dv + o.first, Dv, in.out(0),
                    steps, o.count, o.tid);
  });

  store_owned(offset_or_null<acc_t>(p.dh0, head), Dv, Dk, o, G);
}

template <typename scalar_t, int DK, bool DELTA, bool GATED>
const char* launch_state_grad(StateGradParams p, long long BH, void* stream) {
  using Sh = ColumnShape<scalar_t, DK, 1>;
  p.ntiles = (p.Dv + Sh::OUT - 1) / Sh::OUT;
  return launch_tiles(state_grad_kernel<scalar_t, DK, DELTA, GATED>, p, BH, Sh::smem, stream);
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_state_grad(int dtype, int delta, const void* q, const void* k,
                                      const void* dout, const void* beta, const void* a,
                                      const void* dht, void* du, void* dh0, long long BH, long long T, int Dk,
                                      int Dv, void* stream) {
  using namespace fwp;
  FWP_TRY
  if (const char* e = check_sizes(BH, T, Dk, Dv, 64)) return e;
  if (delta && !beta) return "fwp: the delta rule needs beta";
  StateGradParams p{q, k, dout, beta, a, dht, du, dh0, T, Dk, Dv, 0};
  return dispatch<512>(dtype, Dk, delta, a != nullptr, [&](auto tag, auto len, auto dl, auto gt) {
    return launch_state_grad<typename decltype(tag)::type, decltype(len)::value,
                             decltype(dl)::value, decltype(gt)::value>(p, BH, stream);
  });
  FWP_CATCH
}
