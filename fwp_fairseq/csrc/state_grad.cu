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
  const void *q, *k, *dout, *beta, *a, *dht;  // beta (delta rule), a (gated), dht or nullptr: acc_t
  void *du, *dh0;                             // acc_t du (BH, T, Dv); dh0 or nullptr
  long long T;
  int Dk, Dv, ntiles;
};

template <typename C>
__global__ void __launch_bounds__(kThreads) state_grad_kernel(StateGradParams p) {
  using Sh = ColumnShape<C, 1>;
  using acc_t = typename Sh::acc_t;
  FWP_DECLARE_SMEM(smem);
  const auto in = column_inputs<Sh>(smem, p, p.dout);
  const auto& o = in.o;
  constexpr int R = Sh::R, PT = Sh::PT, OUT = Sh::OUT;
  const long long T = p.T, head = o.bh * p.Dk * p.Dv + o.own();

  acc_t G[PT];  // column o.own() of dL/dS_t
  load_owned(G, offset_or_null<acc_t>(p.dht, head), p.Dv, p.Dk, o);

  chunk_loop<Sh::TC, true>(T, in, [&](long long t0, int steps, int b) {
    const acc_t *bb = in.beta(b), *ab = in.a(b);
    for (int s = steps - 1; s >= 0; --s) {
      acc_t kr[PT], qr[PT];
      const acc_t dj = in.step(b, s, kr, qr);
      acc_t part[2] = {};
#pragma unroll
      for (int x = 0; x < PT; ++x) {
        G[x] += qr[x] * dj;  // the read o_t = S_t^T q_t
        part[(x / 4) & 1] += kr[x] * G[x];
      }
      acc_t du[1] = {part[0] + part[1]};
      group_sum<R>(du);
      if constexpr (Sh::DELTA) {
        const acc_t da = -bb[s] * du[0];  // through the read S'^T_t k_t
#pragma unroll
        for (int x = 0; x < PT; ++x) G[x] += kr[x] * da;
      }
      if constexpr (Sh::GATED) {
#pragma unroll
        for (int x = 0; x < PT; ++x) G[x] *= ab[s];
      }
      if (o.g == 0) in.out(0)[s * OUT + o.ol] = du[0];
    }
    __syncthreads();  // du staged; stage b fully read
    flush_rows<OUT>(static_cast<acc_t*>(p.du) + (o.bh * T + t0) * p.Dv + o.first, p.Dv, in.out(0),
                    steps, o.count, o.tid());
  });

  store_owned(offset_or_null<acc_t>(p.dh0, head), p.Dv, p.Dk, o, G);
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_state_grad(int dtype, int delta, const void* q, const void* k,
                                      const void* dout, const void* beta, const void* a,
                                      const void* dht, void* du, void* dh0, long long BH,
                                      long long T, int Dk, int Dv, const long long* sizes,
                                      void* stream) {
  return fwp::entry(BH, T, Dk, Dv, 64, [&]() -> const char* {
    using namespace fwp;
    const long long kq = BH * T * Dk, vo = BH * T * Dv, st = BH * Dk * Dv;
    if (const char* e = check_sizes("fwp_state_grad", sizes,
                                    {{"q", q, kq, "(BH, T, Dk)", false},
                                     {"k", k, kq, "(BH, T, Dk)", false},
                                     {"dout", dout, vo, "(BH, T, Dv)", false},
                                     {"beta", beta, BH * T, "(BH, T)", !delta},
                                     {"a", a, BH * T, "(BH, T)", true},
                                     {"dht", dht, st, "(BH, Dk, Dv)", true},
                                     {"du", du, vo, "(BH, T, Dv)", false},
                                     {"dh0", dh0, st, "(BH, Dk, Dv)", true}}))
      return e;
    StateGradParams p{q, k, dout, beta, a, dht, du, dh0, T, Dk, Dv, 0};
    return dispatch<512>(dtype, Dk, delta, a != nullptr, [&](auto c) {
      using C = decltype(c);
      return launch_tiles<ColumnShape<C, 1>>(state_grad_kernel<C>, p, Dv, 0, BH, stream);
    });
  });
}
