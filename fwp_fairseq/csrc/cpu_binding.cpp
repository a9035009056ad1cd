// The CPU kernels' Python module (fwp_fairseq/modules/cpu_kernels.py builds it just in time).
#include <torch/extension.h>  // pybind11 and the tensor casters

#include <vector>

at::Tensor short_conv_forward(at::Tensor x, at::Tensor head, at::Tensor wt, int64_t before);
std::vector<at::Tensor> short_conv_backward(at::Tensor gy, at::Tensor x, at::Tensor head, at::Tensor wt,
                                               int64_t before, bool need_x, bool need_head, bool need_w);
std::vector<at::Tensor> output_norm_forward(at::Tensor o, at::Tensor g, at::Tensor sg, at::Tensor w, double eps);
std::vector<at::Tensor> output_norm_backward(at::Tensor grad, at::Tensor o, at::Tensor g, at::Tensor sg, at::Tensor w,
                                                at::Tensor r, bool need_o, bool need_g, bool need_w);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("short_conv_forward", &short_conv_forward, "short depthwise convolution over time (pre-activation)");
    m.def("short_conv_backward", &short_conv_backward, "its gradients to x, head and the taps");
    m.def("output_norm_forward", &output_norm_forward, "RMS norm of the read-out (times SiLU of the gate)");
    m.def("output_norm_backward", &output_norm_backward, "its gradients to o, the gate and the scale");
}
