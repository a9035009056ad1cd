// The output norm of --fwp-output-norm {rms,rms-gated} on the CPU (forward and backward), built
// with short_conv_cpu.cpp by fwp_fairseq/modules/cpu_kernels.py; output_norm.py's PyTorch path
// is the reference. One pass each way instead of PyTorch's pass per elementwise op, and the
// read-out's (B, H, T, D) -> (T, B, H*D) transpose for the output projection done on the way.
//
// o (B, H, T, D) contiguous, the read-out; g (T, B, H*D) contiguous, the gate's pre-activation,
// and sg = sigmoid(g) (PyTorch's vectorised exp: a scalar exp per entry here would cost more
// than the rest) (both empty: "rms"); w (D) the learned scale.
// out[t, b, h*D + d] = o[b,h,t,d] * r * w[d] * g * sg, r = 1 / sqrt(mean_d o^2 + eps), kept
// (B, H, T) for the backward.
#include <ATen/ATen.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

struct Dims {
    int64_t B, H, T, D;
};

// sum_d a[d] * b[d] in 8 interleaved partial sums, which the compiler can keep in one vector
// register (a single running sum would be a chain of dependent scalar adds).
template <typename scalar_t>
inline scalar_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
    scalar_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int l = 0; l < 8; ++l) part[l] += a[d + l] * b[d + l];
    scalar_t sum = 0;
    for (; d < n; ++d) sum += a[d] * b[d];
    for (int l = 0; l < 8; ++l) sum += part[l];
    return sum;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* o, const scalar_t* g, const scalar_t* sg, const scalar_t* w, scalar_t* out,
                    scalar_t* r_out, scalar_t eps, const Dims& s) {
    at::parallel_for(0, s.B * s.H * s.T, 64, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {  // row = (b * H + h) * T + t, o's order
            int64_t t = row % s.T, bh = row / s.T, h = bh % s.H, b = bh / s.H;
            const scalar_t* x = o + row * s.D;
            int64_t at_out = ((t * s.B + b) * s.H + h) * s.D;
            scalar_t r = scalar_t(1) / std::sqrt(dot(x, x, s.D) / scalar_t(s.D) + eps);
            r_out[row] = r;
            scalar_t* y = out + at_out;
            if (g == nullptr) {
                for (int64_t d = 0; d < s.D; ++d) y[d] = x[d] * r * w[d];
            } else {
                const scalar_t *gr = g + at_out, *sr = sg + at_out;
                for (int64_t d = 0; d < s.D; ++d) y[d] = x[d] * r * w[d] * (gr[d] * sr[d]);
            }
        }
    });
}

// Per (b, h) the scale's gradient goes to a partial of its own, summed in a fixed order after:
// the same numbers at any thread count. Branch-free inner loops, so that they vectorise.
template <typename scalar_t>
void backward_kernel(const scalar_t* grad, const scalar_t* o, const scalar_t* g, const scalar_t* sgate,
                     const scalar_t* w, const scalar_t* r_in, scalar_t* go, scalar_t* gg, scalar_t* gw_partial,
                     const Dims& s) {
    at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> n(s.D), gate(s.D, scalar_t(1)), dn(s.D);
        for (int64_t bh = begin; bh < end; ++bh) {
            int64_t h = bh % s.H, b = bh / s.H;
            scalar_t* gw = gw_partial ? gw_partial + bh * s.D : nullptr;
            if (gw)
                for (int64_t d = 0; d < s.D; ++d) gw[d] = 0;
            for (int64_t t = 0; t < s.T; ++t) {
                int64_t row = bh * s.T + t, at_out = ((t * s.B + b) * s.H + h) * s.D;
                const scalar_t *x = o + row * s.D, *G = grad + at_out;
                scalar_t r = r_in[row];
                for (int64_t d = 0; d < s.D; ++d) n[d] = x[d] * r;
                if (g != nullptr) {
                    const scalar_t *z = g + at_out, *sg = sgate + at_out;
                    for (int64_t d = 0; d < s.D; ++d) gate[d] = z[d] * sg[d];
                    if (gg != nullptr) {  // d silu(z) / dz = sg (1 + z (1 - sg))
                        scalar_t* out = gg + at_out;
                        for (int64_t d = 0; d < s.D; ++d)
                            out[d] = G[d] * n[d] * w[d] * sg[d] * (scalar_t(1) + z[d] * (scalar_t(1) - sg[d]));
                    }
                }
                for (int64_t d = 0; d < s.D; ++d) dn[d] = G[d] * w[d] * gate[d];
                if (gw)
                    for (int64_t d = 0; d < s.D; ++d) gw[d] += G[d] * n[d] * gate[d];
                if (go) {  // through the RMS: r (dn - n mean(dn n))
                    scalar_t mean = dot(dn.data(), n.data(), s.D) / scalar_t(s.D);
                    scalar_t* gx = go + row * s.D;
                    for (int64_t d = 0; d < s.D; ++d) gx[d] = r * (dn[d] - n[d] * mean);
                }
            }
        }
    });
}

Dims dims_of(const at::Tensor& o, const at::Tensor& g, const at::Tensor& sg, const at::Tensor& w) {
    TORCH_CHECK(o.dim() == 4 && o.is_contiguous() && !o.is_cuda(), "output_norm_cpu: o must be a contiguous CPU (B, H, T, D) tensor");
    Dims s{o.size(0), o.size(1), o.size(2), o.size(3)};
    TORCH_CHECK(w.dim() == 1 && w.size(0) == s.D && w.is_contiguous() && w.scalar_type() == o.scalar_type(),
                "output_norm_cpu: w must be a contiguous (D) tensor of o's dtype");
    if (g.numel() > 0)
        TORCH_CHECK(g.dim() == 3 && g.is_contiguous() && g.size(0) == s.T && g.size(1) == s.B && g.size(2) == s.H * s.D &&
                        g.scalar_type() == o.scalar_type(),
                    "output_norm_cpu: g must be a contiguous (T, B, H*D) tensor of o's dtype");
    TORCH_CHECK(sg.sizes() == g.sizes() && sg.is_contiguous() && sg.scalar_type() == g.scalar_type(),
                "output_norm_cpu: sg must be sigmoid(g), shaped and typed as g");
    return s;
}

}  // namespace

std::vector<at::Tensor> output_norm_forward(at::Tensor o, at::Tensor g, at::Tensor sg, at::Tensor w, double eps) {
    Dims s = dims_of(o, g, sg, w);
    auto out = at::empty({s.T, s.B, s.H * s.D}, o.options());
    auto r = at::empty({s.B, s.H, s.T}, o.options());
    AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "output_norm_forward", [&] {
        forward_kernel<scalar_t>(o.data_ptr<scalar_t>(), g.numel() ? g.data_ptr<scalar_t>() : nullptr,
                                 g.numel() ? sg.data_ptr<scalar_t>() : nullptr,
                                 w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                                 static_cast<scalar_t>(eps), s);
    });
    return {out, r};
}

std::vector<at::Tensor> output_norm_backward(at::Tensor grad, at::Tensor o, at::Tensor g, at::Tensor sg, at::Tensor w,
                                                at::Tensor r, bool need_o, bool need_g, bool need_w) {
    Dims s = dims_of(o, g, sg, w);
    TORCH_CHECK(grad.is_contiguous() && grad.dim() == 3 && grad.size(0) == s.T && grad.size(1) == s.B &&
                    grad.size(2) == s.H * s.D && grad.scalar_type() == o.scalar_type(),
                "output_norm_cpu: grad must be a contiguous (T, B, H*D) tensor of o's dtype");
    TORCH_CHECK(r.is_contiguous() && r.numel() == s.B * s.H * s.T, "output_norm_cpu: r must be o's (B, H, T) scales");
    auto go = need_o ? at::empty_like(o) : at::Tensor();
    auto gg = need_g && g.numel() ? at::empty_like(g) : at::Tensor();
    auto partial = need_w ? at::empty({s.B * s.H, s.D}, o.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(o.scalar_type(), "output_norm_backward", [&] {
        backward_kernel<scalar_t>(grad.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                                  g.numel() ? g.data_ptr<scalar_t>() : nullptr,
                                  g.numel() ? sg.data_ptr<scalar_t>() : nullptr, w.data_ptr<scalar_t>(),
                                  r.data_ptr<scalar_t>(), need_o ? go.data_ptr<scalar_t>() : nullptr,
                                  gg.defined() ? gg.data_ptr<scalar_t>() : nullptr,
                                  need_w ? partial.data_ptr<scalar_t>() : nullptr, s);
    });
    auto gw = need_w ? partial.sum(0) : at::Tensor();
    return {go, gg, gw};
}
