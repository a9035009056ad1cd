// C entry points of the kernels (no torch types), used by binding.cpp and by the CPU emulator's
// ctypes wrapper in the tests. All tensors are contiguous, on one device, laid out as
//   q, k: (BH, T, Dk) in `dtype`;  v, dout: (BH, T, Dv) in `dtype`;
//   beta and the forget gate a (a_t = exp(g_t), nullptr: no gate): (BH, T), states (h0, ht, dht, dh0): (BH, Dk, Dv), ckpt: (BH, ceil(T/ck_every), Dk, Dv),
//   err, u, da, du: (BH, T, Dv), dkr, lam: (BH, T, Dk), all in the accumulation type (fp64 for
//   kF64, else fp32);
//   o, dq, dk: in `dtype`.
// Dk and Dv must be multiples of 8 (the Python side pads), Dk <= 512, Dv <= 256, and ck_every a
// positive multiple of 64. `sizes` holds the element count of every pointer argument, in argument
// order (any value for one passed as nullptr): each passed buffer must have exactly the count of
// its shape above, else the call fails before launching (never an out-of-bounds access). Each
// returns nullptr on success, else an error message (valid until the thread's next error).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// Forward: o, ht (the final state, if ht != nullptr). For the backward also ckpt (the state
// before every ck_every-th step) and, for the delta rule, err = v - a_t S_{t-1}^T k_t.
const char* fwp_forward(int dtype, int delta, const void* q, const void* k, const void* v,
                        const void* beta, const void* a, const void* h0, void* o, void* ht,
                        void* ckpt, void* err, long long BH, long long T, int Dk, int Dv,
                        int ck_every, const long long* sizes, void* stream);

// Backward, pass A (reverse time, one CTA per head and value tile): the gradient of each step's
// write vector u_t (du = G_t^T k_t) and, if dh0 != nullptr, of the initial state.
const char* fwp_state_grad(int dtype, int delta, const void* q, const void* k, const void* dout,
                           const void* beta, const void* a, const void* dht, void* du, void* dh0,
                           long long BH, long long T, int Dk, int Dv, const long long* sizes,
                           void* stream);

// Backward, pass B (one CTA per head and key-row tile): dq and dk, given the write vectors u and,
// for the delta rule, da = -beta * du (nullptr for the sum rule). Ungated it needs ht; gated
// (a != nullptr) it needs lam, where it writes per key row the terms of the gate gradient summed
// from the end of the sequence (dL/dg = lam summed over rows, plus <dht, ht>), and for the delta
// rule the scratch dkr.
const char* fwp_qk_grad(int dtype, int delta, const void* q, const void* k, const void* dout,
                        const void* u, const void* da, const void* a, const void* ht,
                        const void* dht, const void* ckpt, void* dq, void* dk, void* dkr,
                        void* lam, long long BH, long long T, int Dk, int Dv, int ck_every,
                        const long long* sizes, void* stream);

// ---- chunkwise tensor-core kernels (chunk_fwd.cu, chunk_bwd.cu): fp16/bf16 on the GPU (fp16,
// bf16, fp32, fp64 in the emulator), no forget gate. Dk in {16, 32, 64, 128, 256}, Dv a multiple of
// 16 up to 128. A configuration is a chunk length and a value tile (ntiles = ceil(Dv / tile) CTAs
// per head); NC = ceil(T / chunk), Tp = NC * chunk. A launch whose shared memory exceeds the
// device's opt-in limit per block fails with the numbers.

// The configurations compiled for (Dk, Dv), in order of preference, into chunks[] and tiles[]
// (room for 3); returns their number.
int fwp_chunk_configs(int Dk, int Dv, int* chunks, int* tiles);

// Shared memory per block of the forward (backward = 0) or backward pass of a configuration: the
// kernels' own count, the size each launch asks for; -1 if the configuration is not compiled.
long long fwp_chunk_smem(int dtype, int delta, int backward, int Dk, int chunk, int tile);

// The current device's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin),
// which bounds every launch; in the emulator the value fwp_emu_set_smem_optin set (default:
// unbounded).
long long fwp_device_smem_optin(void);

// Forward: o, ht (if not nullptr), and for the backward states (BH, NC, Dk, Dv), the state before
// every chunk, and, for the delta rule, u (BH, T, Dv), the write vectors (both acc type).
const char* fwp_chunk_forward(int dtype, int delta, const void* q, const void* k, const void* v,
                              const void* beta, const void* h0, void* o, void* ht, void* states,
                              void* u, long long BH, long long T, int Dk, int Dv, int chunk,
                              int tile, const long long* sizes, void* stream);

// Backward: per value tile partials dq, dk and (delta) dkb = dL/d(diag(beta) K), each
// (ntiles, BH, Tp, Dk); dv (BH, T, Dv): dL/dv (sum) or dL/d(diag(beta) V) (delta); dh0 if not
// nullptr. All acc type; the caller sums the partials (cuda_chunk.py). chunk and tile as in the
// forward that stored `states`.
const char* fwp_chunk_backward(int dtype, int delta, const void* q, const void* k, const void* v,
                               const void* beta, const void* dout, const void* states,
                               const void* u, const void* dht, void* dq, void* dk, void* dkb,
                               void* dv, void* dh0, long long BH, long long T, int Dk, int Dv,
                               int chunk, int tile, const long long* sizes, void* stream);

#ifdef __cplusplus
}
#endif
