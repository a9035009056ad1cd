// The short depthwise convolution over time of --fwp-short-conv on the CPU (forward and
// backward), built just in time by fwp_fairseq/modules/cpu_kernels.py. The Python path in
// short_conv.py is the reference; this one exists because on the CPU each pass over a (T, B, C)
// tensor costs about what the arithmetic does, and PyTorch's ops need a pass per tap.
//
// Layout: x (T, B, C) contiguous, head (K-1, B, C) (the rows before x: a causal convolution's
// carried tail) or empty, wt (K, C) the taps, tap j reading x[t - lag_j] with
// lag_j = before - j (before = K-1: causal; (K-1)/2: centred). Rows outside x and head are zero.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

struct Shape {
    int64_t T, B, C, K, rows_before, before;  // rows_before: head's rows (0 without one)
};

// The row of x (or head, at negative times) that time src and batch b name, or nullptr.
template <typename scalar_t>
inline const scalar_t* row_at(const scalar_t* x, const scalar_t* head, const Shape& s, int64_t src, int64_t b) {
    if (src >= 0 && src < s.T) return x + (src * s.B + b) * s.C;
    if (src < 0 && head != nullptr && src + s.rows_before >= 0) return head + ((src + s.rows_before) * s.B + b) * s.C;
    return nullptr;
}

// Channel blocks: each thread owns whole channels, so the weight gradient's sums need no
// reduction across threads and come out the same at any thread count.
inline int64_t channel_block(int64_t C) {
    int64_t per_thread = (C + at::get_num_threads() - 1) / at::get_num_threads();
    return std::max<int64_t>(16, (per_thread + 15) / 16 * 16);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* x, const scalar_t* head, const scalar_t* wt, scalar_t* y, const Shape& s) {
    at::parallel_for(0, s.C, channel_block(s.C), [&](int64_t c0, int64_t c1) {
        for (int64_t t = 0; t < s.T; ++t) {
            for (int64_t b = 0; b < s.B; ++b) {
                scalar_t* out = y + (t * s.B + b) * s.C;
                for (int64_t c = c0; c < c1; ++c) out[c] = scalar_t(0);
                for (int64_t j = 0; j < s.K; ++j) {
                    const scalar_t* in = row_at(x, head, s, t - (s.before - j), b);
                    if (in == nullptr) continue;
                    const scalar_t* w = wt + j * s.C;
                    for (int64_t c = c0; c < c1; ++c) out[c] += w[c] * in[c];
                }
            }
        }
    });
}

// One pass over gy: x's (and head's) gradient, the transposed convolution, and the taps'
// gradient, sum over (t, b) of gy[t] * input_j(t).
template <typename scalar_t>
void backward_kernel(const scalar_t* gy, const scalar_t* x, const scalar_t* head, const scalar_t* wt,
                     scalar_t* gx, scalar_t* ghead, scalar_t* gwt, const Shape& s) {
    at::parallel_for(0, s.C, channel_block(s.C), [&](int64_t c0, int64_t c1) {
        for (int64_t src = -s.rows_before; src < s.T; ++src) {  // every input row, head's first
            for (int64_t b = 0; b < s.B; ++b) {
                scalar_t* g = src >= 0 ? (gx ? gx + (src * s.B + b) * s.C : nullptr)
                                       : (ghead ? ghead + ((src + s.rows_before) * s.B + b) * s.C : nullptr);
                const scalar_t* in = row_at(x, head, s, src, b);
                if (g != nullptr)
                    for (int64_t c = c0; c < c1; ++c) g[c] = scalar_t(0);
                for (int64_t j = 0; j < s.K; ++j) {
                    int64_t t = src + (s.before - j);  // the output that tap j fed from src
                    if (t < 0 || t >= s.T) continue;
                    const scalar_t* gout = gy + (t * s.B + b) * s.C;
                    if (g != nullptr) {
                        const scalar_t* w = wt + j * s.C;
                        for (int64_t c = c0; c < c1; ++c) g[c] += gout[c] * w[c];
                    }
                    if (gwt != nullptr) {
                        scalar_t* gw = gwt + j * s.C;
                        for (int64_t c = c0; c < c1; ++c) gw[c] += gout[c] * in[c];
                    }
                }
            }
        }
    });
}

Shape shape_of(const at::Tensor& x, const at::Tensor& head, const at::Tensor& wt, int64_t before) {
    TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && !x.is_cuda(), "short_conv_cpu: x must be a contiguous CPU (T, B, C) tensor");
    TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && wt.size(1) == x.size(2) && wt.scalar_type() == x.scalar_type(),
                "short_conv_cpu: wt must be a contiguous (K, C) tensor of x's dtype");
    Shape s{x.size(0), x.size(1), x.size(2), wt.size(0), 0, before};
    TORCH_CHECK(before >= 0 && before < s.K, "short_conv_cpu: before must be in [0, K)");
    if (head.numel() > 0) {
        TORCH_CHECK(head.dim() == 3 && head.is_contiguous() && head.size(1) == s.B && head.size(2) == s.C &&
                        head.scalar_type() == x.scalar_type(),
                    "short_conv_cpu: head must be a contiguous (rows, B, C) tensor of x's dtype");
        s.rows_before = head.size(0);
    }
    return s;
}

}  // namespace

at::Tensor short_conv_forward(at::Tensor x, at::Tensor head, at::Tensor wt, int64_t before) {
    Shape s = shape_of(x, head, wt, before);
    auto y = at::empty_like(x);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "short_conv_forward", [&] {
        forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), s.rows_before ? head.data_ptr<scalar_t>() : nullptr,
                                 wt.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), s);
    });
    return y;
}

std::vector<at::Tensor> short_conv_backward(at::Tensor gy, at::Tensor x, at::Tensor head, at::Tensor wt,
                                               int64_t before, bool need_x, bool need_head, bool need_w) {
    Shape s = shape_of(x, head, wt, before);
    TORCH_CHECK(gy.sizes() == x.sizes() && gy.is_contiguous() && gy.scalar_type() == x.scalar_type(),
                "short_conv_cpu: gy must be contiguous and shaped and typed as x");
    auto gx = need_x ? at::empty_like(x) : at::Tensor();
    auto ghead = need_head ? at::empty_like(head) : at::Tensor();
    auto gwt = need_w ? at::zeros_like(wt) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "short_conv_backward", [&] {
        backward_kernel<scalar_t>(gy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                  s.rows_before ? head.data_ptr<scalar_t>() : nullptr, wt.data_ptr<scalar_t>(),
                                  need_x ? gx.data_ptr<scalar_t>() : nullptr,
                                  ghead.defined() && s.rows_before ? ghead.data_ptr<scalar_t>() : nullptr,
                                  need_w ? gwt.data_ptr<scalar_t>() : nullptr, s);
    });
    return {gx, ghead, gwt};
}
