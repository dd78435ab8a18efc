// Input checks and the activation functions of adapter_bottleneck, shared by CPU and CUDA.
#pragma once

#include <string_view>

#include "common/checks.h"

namespace fastpeft {

enum class Activation { kRelu, kGelu, kGeluTanh, kSilu };

// The canonical names only; the Python wrapper maps aliases (swish, gelu_new, ...) to them.
inline Activation parse_activation(std::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "fastpeft: activation must be one of relu, gelu, gelu_tanh, silu, got '",
              std::string(name), "'");
}

// h [M, D], w_down [R, D], b_down [R], w_up [D, R], b_up [D], residual [M, D].
inline void check_adapter_bottleneck_args(const at::Tensor& h, const at::Tensor& w_down,
                                          const std::optional<at::Tensor>& b_down,
                                          const at::Tensor& w_up,
                                          const std::optional<at::Tensor>& b_up,
                                          const std::optional<at::Tensor>& residual) {
  check_dim(h, 2, "h", "[M, hidden]");
  check_dim(w_down, 2, "w_down", "[bottleneck, hidden]");
  check_dim(w_up, 2, "w_up", "[hidden, bottleneck]");
  check_same_device_dtype(h, w_down, "w_down", "h");
  check_same_device_dtype(h, w_up, "w_up", "h");
  const int64_t M = h.size(0), D = h.size(1), R = w_down.size(0);
  TORCH_CHECK(w_down.size(1) == D, "fastpeft: w_down must be [bottleneck, ", D,
              "] to match h's last dim ", D, ", got ", w_down.sizes());
  TORCH_CHECK(w_up.size(0) == D && w_up.size(1) == R, "fastpeft: w_up must be [", D, ", ", R,
              "] (hidden, bottleneck), got ", w_up.sizes());
  if (b_down.has_value()) {
    check_same_device_dtype(h, *b_down, "b_down", "h");
    TORCH_CHECK(b_down->dim() == 1 && b_down->size(0) == R, "fastpeft: b_down must be [", R,
                "] (bottleneck), got ", b_down->sizes());
  }
  if (b_up.has_value()) {
    check_same_device_dtype(h, *b_up, "b_up", "h");
    TORCH_CHECK(b_up->dim() == 1 && b_up->size(0) == D, "fastpeft: b_up must be [", D,
                "] (hidden), got ", b_up->sizes());
  }
  if (residual.has_value()) {
    check_same_device_dtype(h, *residual, "residual", "h");
    TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == D,
                "fastpeft: residual must be [", M, ", ", D, "] like h, got ", residual->sizes());
  }
}

// The backward's extra tensors: grad_out [M, D] and z [M, R], like h.
inline void check_adapter_bottleneck_backward_args(const at::Tensor& grad_out,
                                                   const at::Tensor& h, const at::Tensor& w_down,
                                                   const at::Tensor& w_up, const at::Tensor& z) {
  check_adapter_bottleneck_args(h, w_down, std::nullopt, w_up, std::nullopt, std::nullopt);
  check_same_device_dtype(h, grad_out, "grad_out", "h");
  check_same_device_dtype(h, z, "z", "h");
  const int64_t M = h.size(0), D = h.size(1), R = w_down.size(0);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == M && grad_out.size(1) == D,
              "fastpeft: grad_out must be [", M, ", ", D, "], got ", grad_out.sizes());
  TORCH_CHECK(z.dim() == 2 && z.size(0) == M && z.size(1) == R, "fastpeft: z must be [", M, ", ",
              R, "], got ", z.sizes());
}

}  // namespace fastpeft
