// The column layout of the forward and of backward pass A: one CTA per (head, tile of OUT value
// columns); column j of the state (forward) or of its gradient (pass A) lives in the registers of
// a group of R lanes (Split<DK>). Per step both read k_t and q_t (Dk each), one value per column
// (v_t in the forward, do_t in pass A) and the scalars beta_t (delta rule) and a_t (the forget
// gate, when given), through double-buffered shared-memory stages of TC steps, then stage NOUT
// per-column outputs per step for coalesced stores.
#pragma once

#include "fwp_common.cuh"

namespace fwp {

template <typename scalar_t, int DK, int NOUT>
struct ColumnShape {
  using scalar = scalar_t;
  using acc_t = typename Acc<scalar_t>::type;
  static constexpr int L = DK;  // padded key length
  static constexpr int R = Split<DK>::R, PT = Split<DK>::PT, NV = PT / 4, OUT = kThreads / R;
  static constexpr int TC = chunk_steps(2 * DK * int(sizeof(scalar_t)));
  // Byte offsets inside a stage: k, q, the per-column value, beta, a.
  static constexpr size_t k_bytes = align16(size_t(TC) * DK * sizeof(scalar_t));
  static constexpr size_t x_bytes = align16(size_t(TC) * OUT * sizeof(scalar_t));
  static constexpr size_t s_bytes = align16(size_t(TC) * sizeof(acc_t));
  static constexpr size_t q_off = k_bytes, x_off = 2 * k_bytes, b_off = x_off + x_bytes;
  static constexpr size_t a_off = b_off + s_bytes, stage_bytes = a_off + s_bytes;
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t smem = 2 * stage_bytes + NOUT * out_bytes;
};

// The inputs of one head and column tile, and where each chunk of them sits in shared memory.
template <typename Sh>
struct ColumnInputs {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  unsigned char* smem;
  const scalar_t *kg, *qg, *xg;  // k, q: (T, Dk) of this head; x: (T, Dv) from this tile's column
  const acc_t *bg, *ag;          // beta, a: (T) of this head, or nullptr
  int Dk, Dv, ncols, tid;

  // Issue the copies of steps [t0, t0 + steps) into stage b (the body of chunk_loop's `stage`).
  FWP_DEVICE void operator()(long long t0, int steps, int b) const {
    stage_rows(k(b), Sh::L, kg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(q(b), Sh::L, qg + t0 * Dk, Dk, steps, Dk, tid);
    stage_rows(x(b), Sh::OUT, xg + t0 * Dv, Dv, steps, ncols, tid);
    if (bg) stage_scalars(beta(b), bg + t0, steps, tid);
    if (ag) stage_scalars(a(b), ag + t0, steps, tid);
  }
  FWP_DEVICE scalar_t* k(int b) const { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, 0); }
  FWP_DEVICE scalar_t* q(int b) const { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, Sh::q_off); }
  FWP_DEVICE scalar_t* x(int b) const { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, Sh::x_off); }
  FWP_DEVICE acc_t* beta(int b) const { return stage_part<acc_t>(smem, Sh::stage_bytes, b, Sh::b_off); }
  FWP_DEVICE acc_t* a(int b) const { return stage_part<acc_t>(smem, Sh::stage_bytes, b, Sh::a_off); }
  // Output staging n (0 .. NOUT-1): TC steps x OUT columns.
  FWP_DEVICE acc_t* out(int n) const {
    return reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes + n * Sh::out_bytes);
  }
};

// Zeroed stages and the input pointers of this CTA's head and tile.
template <typename Sh>
FWP_DEVICE ColumnInputs<Sh> column_inputs(unsigned char* smem, const Owner<Sh::R>& o,
                                                   const void* k, const void* q, const void* x,
                                                   const void* beta, const void* a, long long T,
                                                   int Dk, int Dv) {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  zero_stages(smem, 2 * Sh::stage_bytes, o.tid);
  return {smem,
          static_cast<const scalar_t*>(k) + o.bh * T * Dk,
          static_cast<const scalar_t*>(q) + o.bh * T * Dk,
          static_cast<const scalar_t*>(x) + o.bh * T * Dv + o.first,
          offset_or_null<acc_t>(beta, o.bh * T),
          offset_or_null<acc_t>(a, o.bh * T),
          Dk, Dv, o.count, o.tid};
}

}  // namespace fwp
