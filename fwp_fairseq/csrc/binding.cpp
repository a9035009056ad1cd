// PyTorch binding: checks tensors and hands raw pointers to the C entry points in fwp_api.h.
// Outputs are allocated by the caller (fwp_fairseq/ops/cuda_backend.py), so this file only
// validates, picks the dtype code, and turns error text into exceptions.
//
// Only torch/extension.h is included (no torch CUDA headers), so `make cuda-check` can
// syntax-check this file against a CPU-only torch; the caller passes the current CUDA stream as
// an integer and makes q's device current.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "fwp_api.h"

namespace {

using OptT = std::optional<at::Tensor>;

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "fwp: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check(const at::Tensor& t, const char* name, const at::Tensor& like, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "fwp: ", name, " must be on ",
              like.device());
  TORCH_CHECK(t.is_contiguous(), "fwp: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "fwp: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "fwp: ", name,
              " must be 16-byte aligned");
}

const void* opt_ptr(const OptT& t, const char* name, const at::Tensor& like, at::ScalarType dt) {
  if (!t.has_value()) return nullptr;
  check(*t, name, like, dt);
  return t->data_ptr();
}

void raise_on(const char* err) { TORCH_CHECK(err == nullptr, err ? err : ""); }

// Element counts of the pointer arguments, in order (0 for an absent one): the C entry points
// check each against the shape its launch assumes (fwp_api.h).
long long element_count(const at::Tensor& t) { return t.numel(); }
long long element_count(const OptT& t) { return t.has_value() ? t->numel() : 0; }
template <typename... Ts> std::vector<long long> sizes_of(const Ts&... ts) {
  return {element_count(ts)...};
}

// q, k and x (v or dout) share q's device and dtype.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& x,
                  const char* x_name) {
  check(q, "q", q, q.scalar_type());
  check(k, "k", q, q.scalar_type());
  check(x, x_name, q, q.scalar_type());
}

// The forward passes' inputs q, k, v and outputs o (input dtype) and ht (accumulator dtype).
void check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& o, const at::Tensor& ht, at::ScalarType acc) {
  check_inputs(q, k, v, "v");
  check(o, "o", q, q.scalar_type());
  check(ht, "ht", q, acc);
  TORCH_CHECK(q.dim() == 3 && v.dim() == 3, "fwp: q and v must be (BH, T, D)");
}

// q, k: (BH, T, Dk); v, o: (BH, T, Dv). Fills o, ht and (if given) ckpt, err.
void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& beta,
             const OptT& a, const OptT& h0, const at::Tensor& o, const at::Tensor& ht,
             const OptT& ckpt, const OptT& err, int64_t ck_every, bool delta, int64_t stream) {
  const auto acc = acc_type(q);
  check_forward(q, k, v, o, ht, acc);
  const auto sizes = sizes_of(q, k, v, beta, a, h0, o, ht, ckpt, err);
  raise_on(fwp_forward(dtype_code(q), delta, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                       opt_ptr(beta, "beta", q, acc), opt_ptr(a, "a", q, acc),
                       opt_ptr(h0, "h0", q, acc), o.data_ptr(),
                       ht.data_ptr(), const_cast<void*>(opt_ptr(ckpt, "ckpt", q, acc)),
                       const_cast<void*>(opt_ptr(err, "err", q, acc)), q.size(0), q.size(1),
                       static_cast<int>(q.size(2)), static_cast<int>(v.size(2)),
                       static_cast<int>(ck_every), sizes.data(), reinterpret_cast<void*>(stream)));
}

// Pass A: du (BH, T, Dv) and, if given, dh0.
void state_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& dout,
                const OptT& beta, const OptT& a, const OptT& dht, const at::Tensor& du,
                const OptT& dh0, bool delta, int64_t stream) {
  const auto acc = acc_type(q);
  check_inputs(q, k, dout, "dout");
  check(du, "du", q, acc);
  const auto sizes = sizes_of(q, k, dout, beta, a, dht, du, dh0);
  raise_on(fwp_state_grad(dtype_code(q), delta, q.data_ptr(), k.data_ptr(), dout.data_ptr(),
                          opt_ptr(beta, "beta", q, acc), opt_ptr(a, "a", q, acc),
                          opt_ptr(dht, "dht", q, acc),
                          du.data_ptr(), const_cast<void*>(opt_ptr(dh0, "dh0", q, acc)),
                          q.size(0), q.size(1), static_cast<int>(q.size(2)),
                          static_cast<int>(dout.size(2)), sizes.data(),
                          reinterpret_cast<void*>(stream)));
}

// Pass B: dq and dk (BH, T, Dk); gated also lam (BH, T, Dk), with the scratch dkr (delta rule).
void qk_grad(const at::Tensor& q, const at::Tensor& k, const at::Tensor& dout,
             const at::Tensor& u, const OptT& da, const OptT& a, const OptT& ht, const OptT& dht,
             const at::Tensor& ckpt, const at::Tensor& dq, const at::Tensor& dk, const OptT& dkr,
             const OptT& lam, int64_t ck_every, bool delta, int64_t stream) {
  const auto acc = acc_type(q);
  check_inputs(q, k, dout, "dout");
  check(u, "u", q, acc);
  check(ckpt, "ckpt", q, acc);
  check(dq, "dq", q, q.scalar_type());
  check(dk, "dk", q, q.scalar_type());
  const auto sizes = sizes_of(q, k, dout, u, da, a, ht, dht, ckpt, dq, dk, dkr, lam);
  raise_on(fwp_qk_grad(dtype_code(q), delta, q.data_ptr(), k.data_ptr(), dout.data_ptr(),
                       u.data_ptr(), opt_ptr(da, "da", q, acc), opt_ptr(a, "a", q, acc),
                       opt_ptr(ht, "ht", q, acc), opt_ptr(dht, "dht", q, acc), ckpt.data_ptr(),
                       dq.data_ptr(), dk.data_ptr(), const_cast<void*>(opt_ptr(dkr, "dkr", q, acc)),
                       const_cast<void*>(opt_ptr(lam, "lam", q, acc)), q.size(0), q.size(1),
                       static_cast<int>(q.size(2)), static_cast<int>(dout.size(2)),
                       static_cast<int>(ck_every), sizes.data(), reinterpret_cast<void*>(stream)));
}

// Chunk kernels: q, k (BH, T, Dk), v, o (BH, T, Dv); fills o, ht, states, u (fwp_api.h) with the
// configuration (chunk, tile).
void chunk_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const OptT& beta, const OptT& h0, const at::Tensor& o, const at::Tensor& ht,
                   const OptT& states, const OptT& u, int64_t chunk, int64_t tile, bool delta,
                   int64_t stream) {
  const auto acc = acc_type(q);
  check_forward(q, k, v, o, ht, acc);
  const auto sizes = sizes_of(q, k, v, beta, h0, o, ht, states, u);
  raise_on(fwp_chunk_forward(dtype_code(q), delta, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                             opt_ptr(beta, "beta", q, acc), opt_ptr(h0, "h0", q, acc),
                             o.data_ptr(), ht.data_ptr(),
                             const_cast<void*>(opt_ptr(states, "states", q, acc)),
                             const_cast<void*>(opt_ptr(u, "u", q, acc)), q.size(0), q.size(1),
                             static_cast<int>(q.size(2)), static_cast<int>(v.size(2)),
                             static_cast<int>(chunk), static_cast<int>(tile), sizes.data(),
                             reinterpret_cast<void*>(stream)));
}

// Chunk backward: partials dq, dk, dkb (ntiles, BH, Tp, Dk), dv (BH, T, Dv), dh0.
void chunk_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const OptT& beta, const at::Tensor& dout, const at::Tensor& states,
                    const OptT& u, const OptT& dht, const at::Tensor& dq, const at::Tensor& dk,
                    const OptT& dkb, const at::Tensor& dv, const OptT& dh0, int64_t chunk,
                    int64_t tile, bool delta, int64_t stream) {
  const auto acc = acc_type(q);
  check_inputs(q, k, v, "v");
  check(dout, "dout", q, q.scalar_type());
  check(states, "states", q, acc);
  check(dq, "dq", q, acc);
  check(dk, "dk", q, acc);
  check(dv, "dv", q, acc);
  const auto sizes = sizes_of(q, k, v, beta, dout, states, u, dht, dq, dk, dkb, dv, dh0);
  raise_on(fwp_chunk_backward(dtype_code(q), delta, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                              opt_ptr(beta, "beta", q, acc), dout.data_ptr(), states.data_ptr(),
                              opt_ptr(u, "u", q, acc), opt_ptr(dht, "dht", q, acc), dq.data_ptr(),
                              dk.data_ptr(), const_cast<void*>(opt_ptr(dkb, "dkb", q, acc)),
                              dv.data_ptr(), const_cast<void*>(opt_ptr(dh0, "dh0", q, acc)),
                              q.size(0), q.size(1), static_cast<int>(q.size(2)),
                              static_cast<int>(v.size(2)), static_cast<int>(chunk),
                              static_cast<int>(tile), sizes.data(), reinterpret_cast<void*>(stream)));
}

// The chunk kernels' configurations for (Dk, Dv), in order of preference: (chunk, tile) pairs.
std::vector<std::pair<int, int>> chunk_configs(int64_t Dk, int64_t Dv) {
  int chunks[3], tiles[3];
  const int n = fwp_chunk_configs(static_cast<int>(Dk), static_cast<int>(Dv), chunks, tiles);
  std::vector<std::pair<int, int>> out;
  for (int i = 0; i < n; ++i) out.emplace_back(chunks[i], tiles[i]);
  return out;
}

// Shared memory per block of a chunk pass for inputs like `like` (its dtype), -1 if not compiled.
int64_t chunk_smem(const at::Tensor& like, bool delta, bool backward, int64_t Dk, int64_t chunk,
                   int64_t tile) {
  return fwp_chunk_smem(dtype_code(like), delta, backward, static_cast<int>(Dk),
                        static_cast<int>(chunk), static_cast<int>(tile));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fwp_fairseq CUDA recurrences for the sum and delta rules, with an optional forget gate";
  m.def("forward", &forward, "forward (fills o, ht, ckpt, err)");
  m.def("state_grad", &state_grad, "backward pass A (fills du, dh0)");
  m.def("qk_grad", &qk_grad, "backward pass B (fills dq, dk; gated also lam)");
  m.def("chunk_forward", &chunk_forward, "chunk forward (fills o, ht, states, u)");
  m.def("chunk_backward", &chunk_backward, "chunk backward (fills dq, dk, dkb partials, dv, dh0)");
  m.def("chunk_configs", &chunk_configs, "(chunk, tile) configurations, preferred first");
  m.def("chunk_smem", &chunk_smem, "shared memory per block of a chunk pass (kernels' own count)");
  m.def("device_smem_optin", &fwp_device_smem_optin,
        "the current device's opt-in shared memory per block (bounds every launch)");
}
