// The row layout of backward pass B: one CTA per (head, tile of OUT key rows); row i of the state
// S and of its gradient G lives in the registers of a group of R lanes (Split<DV>). Per step it
// reads k_t[i], q_t[i] (one per row), do_t, u_t and, for the delta rule, da_t (Dv each), and with
// the forget gate a_t; the gated backward's second sweep also reads back two per-row values of
// its first sweep (dk's read term, the gate gradient's terms). All of it comes through
// double-buffered shared-memory stages of TC steps; NOUT per-row outputs are staged per step.
#pragma once

#include "fwp_common.cuh"

namespace fwp {

template <typename scalar_t, int DV, bool DELTA, bool GATED>
struct RowShape {
  using scalar = scalar_t;
  using acc_t = typename Acc<scalar_t>::type;
  static constexpr int L = DV;  // padded value length
  static constexpr int R = Split<DV>::R, PT = Split<DV>::PT, NV = PT / 4, OUT = kThreads / R;
  static constexpr int NOUT = GATED ? 3 : 2, NBACK = GATED ? (DELTA ? 2 : 1) : 0;
  static constexpr int TC = chunk_steps(int(
      (2 * OUT + DV) * sizeof(scalar_t) + (DELTA ? 2 : 1) * DV * sizeof(acc_t) +
      (GATED ? 1 + NBACK * OUT : 0) * sizeof(acc_t)));
  // Byte offsets inside a stage: k, q, do, u, da, a, then the read-back rows.
  static constexpr size_t k_bytes = align16(size_t(TC) * OUT * sizeof(scalar_t));
  static constexpr size_t d_bytes = align16(size_t(TC) * DV * sizeof(scalar_t));
  static constexpr size_t u_bytes = align16(size_t(TC) * DV * sizeof(acc_t));
  static constexpr size_t out_bytes = align16(size_t(TC) * OUT * sizeof(acc_t));
  static constexpr size_t q_off = k_bytes, d_off = 2 * k_bytes, u_off = d_off + d_bytes;
  static constexpr size_t da_off = u_off + u_bytes, a_off = da_off + (DELTA ? u_bytes : 0);
  static constexpr size_t back_off = a_off + (GATED ? align16(size_t(TC) * sizeof(acc_t)) : 0);
  static constexpr size_t stage_bytes = back_off + NBACK * out_bytes;
  static constexpr size_t smem = 2 * stage_bytes + NOUT * out_bytes;
};

// The inputs of one head and row tile, and where each chunk of them sits in shared memory.
template <typename Sh>
struct RowInputs {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  static constexpr int OUT = Sh::OUT;
  unsigned char* smem;
  const scalar_t *kg, *qg;  // (T, Dk) of this head, from this tile's first row
  const scalar_t* dg;       // do: (T, Dv)
  const acc_t *ug, *dag;    // u, da: (T, Dv); da nullptr for the sum rule
  const acc_t* ag;          // a: (T), or nullptr
  const acc_t* back[2];     // read-back rows (T, Dk) from this tile's first row, or nullptr
  int Dk, Dv, nrows, tid;

  // Issue the copies of steps [t0, t0 + steps) into stage b (the body of chunk_loop's `stage`).
  FWP_DEVICE void operator()(long long t0, int steps, int b) const {
    stage_rows(k(b), OUT, kg + t0 * Dk, Dk, steps, nrows, tid);
    stage_rows(q(b), OUT, qg + t0 * Dk, Dk, steps, nrows, tid);
    stage_rows(d(b), Sh::L, dg + t0 * Dv, Dv, steps, Dv, tid);
    stage_rows(u(b), Sh::L, ug + t0 * Dv, Dv, steps, Dv, tid);
    if (dag) stage_rows(da(b), Sh::L, dag + t0 * Dv, Dv, steps, Dv, tid);
    if (ag) stage_scalars(a(b), ag + t0, steps, tid);
    for (int n = 0; n < Sh::NBACK; ++n)
      if (back[n]) stage_rows(read_back(b, n), OUT, back[n] + t0 * Dk, Dk, steps, nrows, tid);
  }
  FWP_DEVICE scalar_t* k(int b) const { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, 0); }
  FWP_DEVICE scalar_t* q(int b) const { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, Sh::q_off); }
  FWP_DEVICE scalar_t* d(int b) const { return stage_part<scalar_t>(smem, Sh::stage_bytes, b, Sh::d_off); }
  FWP_DEVICE acc_t* u(int b) const { return stage_part<acc_t>(smem, Sh::stage_bytes, b, Sh::u_off); }
  FWP_DEVICE acc_t* da(int b) const { return stage_part<acc_t>(smem, Sh::stage_bytes, b, Sh::da_off); }
  FWP_DEVICE acc_t* a(int b) const { return stage_part<acc_t>(smem, Sh::stage_bytes, b, Sh::a_off); }
  FWP_DEVICE acc_t* read_back(int b, int n) const {
    return stage_part<acc_t>(smem, Sh::stage_bytes, b, Sh::back_off + n * Sh::out_bytes);
  }
  // Output staging n (0 .. NOUT-1): TC steps x OUT rows.
  FWP_DEVICE acc_t* out(int n) const {
    return reinterpret_cast<acc_t*>(smem + 2 * Sh::stage_bytes + n * Sh::out_bytes);
  }
};

// Zeroed stages and the input pointers of this CTA's head and tile (no read-back rows yet).
template <typename Sh>
FWP_DEVICE RowInputs<Sh> row_inputs(unsigned char* smem, const Owner<Sh::R>& o, const void* k,
                                    const void* q, const void* dout, const void* u,
                                    const void* da, const void* a, long long T, int Dk, int Dv) {
  using scalar_t = typename Sh::scalar;
  using acc_t = typename Sh::acc_t;
  zero_stages(smem, 2 * Sh::stage_bytes, o.tid);
  return {smem,
          static_cast<const scalar_t*>(k) + o.bh * T * Dk + o.first,
          static_cast<const scalar_t*>(q) + o.bh * T * Dk + o.first,
          static_cast<const scalar_t*>(dout) + o.bh * T * Dv,
          static_cast<const acc_t*>(u) + o.bh * T * Dv,
          offset_or_null<acc_t>(da, o.bh * T * Dv),
          offset_or_null<acc_t>(a, o.bh * T),
          {nullptr, nullptr},
          Dk, Dv, o.count, o.tid};
}

}  // namespace fwp
