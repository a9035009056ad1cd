// Forward of the causal sum and delta rules.
//
// One CTA per (head, tile of OUT value columns). Column j of the state S (Dk x Dv) evolves on its
// own given k_t, beta_t and v_t[j], so each column lives in the registers of a group of R lanes
// (Split<DK>) for the whole sequence: no atomics, no cross-CTA traffic. Per step, one butterfly
// sums three partial dot products at once:
//   a = S_{t-1}^T k_t,  b = S_{t-1}^T q_t,  c = k_t . q_t
//   delta: e = v_t - a, u = beta_t e;   sum: u = v_t
//   S_t = S_{t-1} + k_t u^T;   o_t = S_t^T q_t = b + c u
// Inputs arrive through double-buffered shared-memory stages of TC steps (cp.async).
#include "fwp_api.h"
#include "fwp_common.cuh"

namespace fwp {
namespace {

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* beta;  // acc_t, delta rule only
  const void* h0;    // acc_t or nullptr
  void* o;
  void* ht;    // acc_t or nullptr
  void* ckpt;  // acc_t or nullptr
  void* err;   // acc_t or nullptr (delta rule, for the backward)
  long long T;
  int Dk, Dv, ck_every, ntiles;
};

template <typename scalar_t, int DK>
struct FwdShape {
  using acc_t = typename Acc<scalar_t>::type;
  static constexpr int R = Split<DK>::R, PT = Split<DK>::PT, OUT = kThreads / R;
  static constexpr int TC = chunk_steps(2 * DK * int(sizeof(scalar_t)));
  // Byte offsets: [stage 0 | stage 1] of (k, q, v, beta), then the per-chunk output staging.
  static constexpr size_t k_bytes = align16(size_t(TC) * DK * sizeof(scalar_t));
  static constexpr size_t v_bytes = align16(size_t(TC) * OUT * sizeof(scalar_t));
  static constexpr size_t b_bytes = align16(size_t(TC) * sizeof(acc_t));
  static constexpr size_t stage_bytes = 2 * k_bytes + v_bytes + b_bytes;
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t smem = 2 * stage_bytes + 2 * out_bytes;
};

template <typename scalar_t, int DK, bool DELTA>
__global__ void __launch_bounds__(kThreads) fwd_kernel(FwdParams p) {
  using Sh = FwdShape<scalar_t, DK>;
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
  const scalar_t* vg = static_cast<const scalar_t*>(p.v) + bh * T * Dv + col0;
  const acc_t* bg = DELTA ? static_cast<const acc_t*>(p.beta) + bh * T : nullptr;

  auto kbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes); };
  auto qbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes + Sh::k_bytes); };
  auto vbuf = [&](int b) { return reinterpret_cast<scalar_t*>(smem + b * Sh::stage_bytes + 2 * Sh::k_bytes); };
  auto bbuf = [&](int b) {
    return reinterpret_cast<acc_t*>(smem + b * Sh::stage_bytes + 2 * Sh::k_bytes + Sh::v_bytes);
  };
  acc_t* obuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes);
  acc_t* ebuf = reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes + Sh::out_bytes);

  // Zero the stages once: rows past Dk and columns past ncols are never copied and must read 0.
  for (size_t x = tid; x < 2 * Sh::stage_bytes / 4; x += kThreads)
    reinterpret_cast<uint32_t*>(smem)[x] = 0u;
  __syncthreads();

  auto stage = [&](long long c, int b) {
    const long long t0 = c * TC;
    const int steps = static_cast<int>(lmin(TC, T - t0));
    stage_rows(kbuf(b), DK, kg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(qbuf(b), DK, qg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(vbuf(b), OUT, vg + t0 * Dv, Dv, steps, ncols, tid);
    if constexpr (DELTA) stage_scalars(bbuf(b), bg + t0, steps, tid);
    copy_commit();
  };

  // This lane's rows of column j: 4 * (g + R * m) + e.
  acc_t S[PT];
#pragma unroll
  for (int m = 0; m < NV; ++m)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int row = 4 * (g + R * m) + e;
      S[4 * m + e] = (p.h0 && col_ok && row < Dk)
                         ? static_cast<const acc_t*>(p.h0)[(bh * Dk + row) * Dv + j]
                         : acc_t(0);
    }

  const long long nchunks = (T + TC - 1) / TC;
  const long long nck = (T + p.ck_every - 1) / p.ck_every;
  stage(0, 0);
  for (long long c = 0; c < nchunks; ++c) {
    const int b = static_cast<int>(c & 1);
    if (c + 1 < nchunks) {
      stage(c + 1, b ^ 1);
      copy_wait_but_one();
    } else {
      copy_wait_all();
    }
    __syncthreads();  // chunk c is in shared memory for every thread

    const long long t0 = c * TC;
    const int steps = static_cast<int>(lmin(TC, T - t0));
    if (p.ckpt && t0 % p.ck_every == 0 && col_ok) {  // the state before step t0
      acc_t* ck = static_cast<acc_t*>(p.ckpt) + ((bh * nck + t0 / p.ck_every) * Dk) * Dv + j;
#pragma unroll
      for (int m = 0; m < NV; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 4 * (g + R * m) + e;
          if (row < Dk) ck[row * Dv] = S[4 * m + e];
        }
    }

    const scalar_t* kb = kbuf(b);
    const scalar_t* qb = qbuf(b);
    const scalar_t* vb = vbuf(b);
    const acc_t* bb = bbuf(b);
    for (int s = 0; s < steps; ++s) {
      acc_t kr[PT];
      acc_t part[2][3] = {};  // two interleaved chains per sum shorten the FMA dependency
#pragma unroll
      for (int m = 0; m < NV; ++m) {
        acc_t kk[4], qr[4];
        load4(kb + s * DK + 4 * (g + R * m), kk);
        load4(qb + s * DK + 4 * (g + R * m), qr);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const acc_t kv = kk[e], sv = S[4 * m + e];
          kr[4 * m + e] = kv;
          part[m & 1][0] += kv * sv;
          part[m & 1][1] += qr[e] * sv;
          part[m & 1][2] += kv * qr[e];
        }
      }
      acc_t sums[3] = {part[0][0] + part[1][0], part[0][1] + part[1][1], part[0][2] + part[1][2]};
      group_sum<R>(sums);
      const acc_t vj = to_acc(vb[s * OUT + ol]);
      acc_t u, err = acc_t(0);
      if constexpr (DELTA) {
        err = vj - sums[0];
        u = bb[s] * err;
      } else {
        u = vj;
      }
#pragma unroll
      for (int x = 0; x < PT; ++x) S[x] += kr[x] * u;
      if (g == 0) {
        obuf[s * OUT + ol] = sums[1] + sums[2] * u;
        if constexpr (DELTA) ebuf[s * OUT + ol] = err;
      }
    }
    __syncthreads();  // outputs staged; stage b fully read (the next prefetch overwrites it)

    scalar_t* og = static_cast<scalar_t*>(p.o) + (bh * T + t0) * Dv + col0;
    acc_t* eg = DELTA && p.err ? static_cast<acc_t*>(p.err) + (bh * T + t0) * Dv + col0 : nullptr;
    for (int x = tid; x < steps * ncols; x += kThreads) {
      const int s = x / ncols, cc = x - s * ncols;
      store_out(og + s * Dv + cc, obuf[s * OUT + cc]);
      if (eg) eg[s * Dv + cc] = ebuf[s * OUT + cc];
    }
  }

  if (p.ht && col_ok) {
    acc_t* ht = static_cast<acc_t*>(p.ht) + bh * Dk * Dv + j;
#pragma unroll
    for (int m = 0; m < NV; ++m)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = 4 * (g + R * m) + e;
        if (row < Dk) ht[row * Dv] = S[4 * m + e];
      }
  }
}

template <typename scalar_t, int DK, bool DELTA>
const char* launch_fwd(FwdParams p, long long BH, void* stream) {
  using Sh = FwdShape<scalar_t, DK>;
  if (p.ck_every % Sh::TC) return kBadCkEvery;
  p.ntiles = (p.Dv + Sh::OUT - 1) / Sh::OUT;
  auto kernel = fwd_kernel<scalar_t, DK, DELTA>;
  if (BH * p.ntiles > 2147483647LL) return "fwp: more (head, tile) blocks than one grid holds";
  if (const char* e = prepare_launch(kernel, Sh::smem)) return e;
  FWP_LAUNCH(kernel, BH * p.ntiles, Sh::smem, stream, p);
  return launch_error();
}

}  // namespace
}  // namespace fwp

extern "C" const char* fwp_forward(int dtype, int delta, const void* q, const void* k,
                                   const void* v, const void* beta, const void* h0, void* o,
                                   void* ht, void* ckpt, void* err, long long BH, long long T,
                                   int Dk, int Dv, int ck_every, void* stream) {
  using namespace fwp;
  FWP_TRY
  if (const char* e = check_sizes(BH, T, Dk, Dv, ck_every)) return e;
  if (delta && !beta) return "fwp: the delta rule needs beta";
  FwdParams p{q, k, v, beta, h0, o, ht, ckpt, err, T, Dk, Dv, ck_every, 0};
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    return dispatch_len<512>(Dk, [&](auto len) {
      constexpr int DK = decltype(len)::value;
      return delta ? launch_fwd<scalar_t, DK, true>(p, BH, stream)
                   : launch_fwd<scalar_t, DK, false>(p, BH, stream);
    });
  });
  FWP_CATCH
}
