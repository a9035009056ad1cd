// The column layout of the forward and of backward pass A: one CTA per (head, tile of OUT value
// columns); column j of the state (forward) or of its gradient (pass A) lives in the registers of
// a group of R lanes (Split<Dk>). Per step both read k_t and q_t (Dk each), one value per column
// (v_t in the forward, do_t in pass A) and the scalars beta_t (delta rule) and a_t (the forget
// gate, when given), through double-buffered shared-memory stages of TC steps, then stage NOUT
// per-column outputs per step for coalesced stores.
#pragma once

#include "fwp_common.cuh"

namespace fwp {

template <typename C, int NOUT>
struct ColumnShape : C {
  using scalar_t = typename C::scalar;
  using acc_t = typename C::acc_t;
  static constexpr int TC = chunk_steps(2 * C::L * int(sizeof(scalar_t)));
  // Byte offsets inside a stage: k, q, the per-column value, beta, a (gated only).
  static constexpr size_t k_bytes = align16(size_t(TC) * C::L * sizeof(scalar_t));
  static constexpr size_t x_bytes = align16(size_t(TC) * C::OUT * sizeof(scalar_t));
  static constexpr size_t s_bytes = align16(size_t(TC) * sizeof(acc_t));
  static constexpr size_t q_off = k_bytes, x_off = 2 * k_bytes, b_off = x_off + x_bytes;
  static constexpr size_t a_off = b_off + s_bytes, stage_bytes = a_off + (C::GATED ? s_bytes : 0);
  static constexpr size_t out_bytes = align16(size_t(TC) * C::OUT * sizeof(acc_t));
  static constexpr size_t smem = 2 * stage_bytes + NOUT * out_bytes;
};

// The inputs of one head and column tile, and where each chunk of them sits in shared memory.
template <typename Sh>
struct ColumnInputs : Stages<Sh> {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  Owner<Sh::R> o;                // this thread; its group owns value column o.own()
  const scalar_t *kg, *qg, *xg;  // k, q: (T, Dk) of this head; x: (T, Dv) from this tile's column
  const acc_t *bg, *ag;          // beta, a: (T) of this head, or nullptr
  int Dk, Dv;

  // Issue the copies of steps [t0, t0 + steps) into stage b (the body of chunk_loop's `stage`).
  FWP_DEVICE void operator()(long long t0, int steps, int b) const {
    stage_rows(this->k(b), Sh::L, kg + t0 * Dk, Dk, steps, Dk, o.tid());
    stage_rows(this->q(b), Sh::L, qg + t0 * Dk, Dk, steps, Dk, o.tid());
    stage_rows(x(b), Sh::OUT, xg + t0 * Dv, Dv, steps, o.count, o.tid());
    if (bg) stage_scalars(beta(b), bg + t0, steps, o.tid());
    if (ag) stage_scalars(a(b), ag + t0, steps, o.tid());
  }
  // Step s of stage b as this lane sees it: its PT entries of k_t and q_t; returns x_t of its
  // column.
  FWP_DEVICE acc_t step(int b, int s, acc_t (&kr)[Sh::PT], acc_t (&qr)[Sh::PT]) const {
#pragma unroll
    for (int m = 0; m < Sh::NV; ++m) {
      load4(this->k(b) + s * Sh::L + 4 * (o.g + Sh::R * m), kr + 4 * m);
      load4(this->q(b) + s * Sh::L + 4 * (o.g + Sh::R * m), qr + 4 * m);
    }
    return to_acc(x(b)[s * Sh::OUT + o.ol]);
  }
  FWP_DEVICE scalar_t* x(int b) const { return this->template part<scalar_t>(b, Sh::x_off); }
  FWP_DEVICE acc_t* beta(int b) const { return this->template part<acc_t>(b, Sh::b_off); }
  FWP_DEVICE acc_t* a(int b) const { return this->template part<acc_t>(b, Sh::a_off); }
};

// This thread's owner, zeroed stages and the input pointers of its head and tile; x is v in the
// forward, dout in pass A.
template <typename Sh, typename P>
FWP_DEVICE ColumnInputs<Sh> column_inputs(unsigned char* smem, const P& p, const void* x) {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  const Owner<Sh::R> o(p.ntiles, p.Dv);
  zero_stages(smem, 2 * Sh::stage_bytes, o.tid());
  return {{smem},
          o,
          static_cast<const scalar_t*>(p.k) + o.bh * p.T * p.Dk,
          static_cast<const scalar_t*>(p.q) + o.bh * p.T * p.Dk,
          static_cast<const scalar_t*>(x) + o.bh * p.T * p.Dv + o.first,
          Sh::DELTA ? offset_or_null<acc_t>(p.beta, o.bh * p.T) : nullptr,
          Sh::GATED ? offset_or_null<acc_t>(p.a, o.bh * p.T) : nullptr,
          p.Dk, p.Dv};
}

}  // namespace fwp
