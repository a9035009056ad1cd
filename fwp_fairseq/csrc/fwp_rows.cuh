// The row layout of backward pass B: one CTA per (head, tile of OUT key rows); row i of the state
// S and of its gradient G lives in the registers of a group of R lanes (Split<Dv>). Per step it
// reads k_t[i], q_t[i] (one per row), do_t, u_t and, for the delta rule, da_t (Dv each), and with
// the forget gate a_t; the gated backward's second sweep also reads back two per-row values of
// its first sweep (dk's read term, the gate gradient's terms). All of it comes through
// double-buffered shared-memory stages of TC steps; NOUT per-row outputs are staged per step.
#pragma once

#include "fwp_common.cuh"

namespace fwp {

template <typename C>
struct RowShape : C {
  using scalar_t = typename C::scalar;
  using acc_t = typename C::acc_t;
  static constexpr int DV = C::L, OUT = C::OUT, NOUT = C::GATED ? 3 : 2;
  static constexpr int NBACK = C::GATED ? (C::DELTA ? 2 : 1) : 0;
  static constexpr int TC = chunk_steps(int(
      (2 * OUT + DV) * sizeof(scalar_t) + (C::DELTA ? 2 : 1) * DV * sizeof(acc_t) +
      (C::GATED ? 1 + NBACK * OUT : 0) * sizeof(acc_t)));
  // Byte offsets inside a stage: k, q, do, u, da, a, then the read-back rows.
  static constexpr size_t k_bytes = align16(size_t(TC) * OUT * sizeof(scalar_t));
  static constexpr size_t d_bytes = align16(size_t(TC) * DV * sizeof(scalar_t));
  static constexpr size_t u_bytes = align16(size_t(TC) * DV * sizeof(acc_t));
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t q_off = k_bytes, d_off = 2 * k_bytes, u_off = d_off + d_bytes;
  static constexpr size_t da_off = u_off + u_bytes, a_off = da_off + (C::DELTA ? u_bytes : 0);
  static constexpr size_t back_off = a_off + (C::GATED ? align16(size_t(TC) * sizeof(acc_t)) : 0);
  static constexpr size_t stage_bytes = back_off + NBACK * out_bytes;
  static constexpr size_t smem = 2 * stage_bytes + NOUT * out_bytes;
};

// The inputs of one head and row tile, and where each chunk of them sits in shared memory.
template <typename Sh>
struct RowInputs : Stages<Sh> {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  static constexpr int OUT = Sh::OUT, PT = Sh::PT;
  Owner<Sh::R> o;           // this thread; its group owns key row o.own()
  const scalar_t *kg, *qg;  // (T, Dk) of this head, from this tile's first row
  const scalar_t* dg;       // do: (T, Dv)
  const acc_t *ug, *dag;    // u, da: (T, Dv); da nullptr for the sum rule
  const acc_t* ag;          // a: (T), or nullptr
  const acc_t* back[2];     // read-back rows (T, Dk) from this tile's first row, or nullptr
  int Dk, Dv;

  // Issue the copies of steps [t0, t0 + steps) into stage b (the body of chunk_loop's `stage`).
  FWP_DEVICE void operator()(long long t0, int steps, int b) const {
    const int tid = o.tid();
    stage_rows(this->k(b), OUT, kg + t0 * Dk, Dk, steps, o.count, tid);
    stage_rows(this->q(b), OUT, qg + t0 * Dk, Dk, steps, o.count, tid);
    stage_rows(d(b), Sh::L, dg + t0 * Dv, Dv, steps, Dv, tid);
    stage_rows(u(b), Sh::L, ug + t0 * Dv, Dv, steps, Dv, tid);
    if (dag) stage_rows(da(b), Sh::L, dag + t0 * Dv, Dv, steps, Dv, tid);
    if (ag) stage_scalars(a(b), ag + t0, steps, tid);
    for (int n = 0; n < Sh::NBACK; ++n)
      if (back[n]) stage_rows(read_back(b, n), OUT, back[n] + t0 * Dk, Dk, steps, o.count, tid);
  }
  FWP_DEVICE scalar_t* d(int b) const { return this->template part<scalar_t>(b, Sh::d_off); }
  FWP_DEVICE acc_t* u(int b) const { return this->template part<acc_t>(b, Sh::u_off); }
  FWP_DEVICE acc_t* da(int b) const { return this->template part<acc_t>(b, Sh::da_off); }
  FWP_DEVICE acc_t* a(int b) const { return this->template part<acc_t>(b, Sh::a_off); }
  FWP_DEVICE acc_t* read_back(int b, int n) const {
    return this->template part<acc_t>(b, Sh::back_off + n * Sh::out_bytes);
  }
  // Step s of stage b as this lane sees it: k_t[i], q_t[i] of its row and, for its PT columns,
  // do_t, u_t and (delta rule) da_t.
  FWP_DEVICE void step(int b, int s, acc_t& ki, acc_t& qi, acc_t (&dd)[PT], acc_t (&uu)[PT],
                       acc_t (&aa)[PT]) const {
    ki = to_acc(this->k(b)[s * OUT + o.ol]);
    qi = to_acc(this->q(b)[s * OUT + o.ol]);
#pragma unroll
    for (int m = 0; m < PT / 4; ++m) {
      const int off = s * Sh::L + 4 * (o.g + Sh::R * m);
      load4(d(b) + off, dd + 4 * m);
      load4(u(b) + off, uu + 4 * m);
      if constexpr (Sh::DELTA) load4(da(b) + off, aa + 4 * m);
    }
  }
};

// This thread's owner, zeroed stages and the input pointers of its head and tile (no read-back
// rows yet).
template <typename Sh, typename P>
FWP_DEVICE RowInputs<Sh> row_inputs(unsigned char* smem, const P& p) {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  const Owner<Sh::R> o(p.ntiles, p.Dk);
  const long long T = p.T, Dk = p.Dk, Dv = p.Dv;
  zero_stages(smem, 2 * Sh::stage_bytes, o.tid());
  return {{smem},
          o,
          static_cast<const scalar_t*>(p.k) + o.bh * T * Dk + o.first,
          static_cast<const scalar_t*>(p.q) + o.bh * T * Dk + o.first,
          static_cast<const scalar_t*>(p.dout) + o.bh * T * Dv,
          static_cast<const acc_t*>(p.u) + o.bh * T * Dv,
          Sh::DELTA ? offset_or_null<acc_t>(p.da, o.bh * T * Dv) : nullptr,
          Sh::GATED ? offset_or_null<acc_t>(p.a, o.bh * T) : nullptr,
          {nullptr, nullptr},
          p.Dk, p.Dv};
}

// Row o.own() of the exact state before step t0 (a multiple of ck_every) in the checkpoints
// (BH, ceil(T / ck_every), Dk, Dv).
template <typename A, typename P, int R>
FWP_DEVICE const A* checkpoint_row(const P& p, const Owner<R>& o, long long t0) {
  const long long nck = (p.T + p.ck_every - 1) / p.ck_every;
  return static_cast<const A*>(p.ckpt) + ((o.bh * nck + t0 / p.ck_every) * p.Dk + o.own()) * p.Dv;
}

}  // namespace fwp
