// Input checks of ia3_linear, shared by its CPU and CUDA kernels.
#pragma once

#include "common/checks.h"

namespace fastpeft {

// x [M, K], weight [N, K], bias [N] or none, scale [K] (scale_input) or [N].
inline void check_ia3_linear_args(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& scale,
                                  bool scale_input) {
  check_dim(x, 2, "x", "[M, in_features]");
  check_dim(weight, 2, "weight", "[out_features, in_features]");
  check_same_device_dtype(x, weight, "weight");
  check_same_device_dtype(x, scale, "scale");
  const int64_t K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "fastpeft: weight must be [out_features, ", K,
              "] to match x's last dim ", K, ", got ", weight.sizes());
  check_optional_vector(x, bias, N, "bias", "out_features");
  const int64_t n = scale_input ? K : N;
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == n, "fastpeft: scale must be [", n, "] (",
              scale_input ? "in_features, scale_input=True" : "out_features, scale_input=False",
              "), got ", scale.sizes());
}

// The backward's extra tensors: grad_out [M, N]; unscaled [M, N] (given) or a 1-D empty tensor
// (not given); x [M, K], or a 1-D empty tensor when not needed: x is needed for grad_weight,
// and for grad_scale unless unscaled is given (scale_input=False).
inline bool ia3_has_unscaled(const at::Tensor& unscaled) { return unscaled.dim() == 2; }

inline void check_ia3_linear_backward_args(const at::Tensor& grad_out, const at::Tensor& x,
                                           const at::Tensor& weight, const at::Tensor& scale,
                                           const at::Tensor& unscaled, bool scale_input,
                                           bool need_grad_weight, bool need_grad_scale) {
  check_dim(grad_out, 2, "grad_out", "[M, out_features]");
  check_same_device_dtype(grad_out, weight, "weight", "grad_out");
  check_same_device_dtype(grad_out, scale, "scale", "grad_out");
  const int64_t M = grad_out.size(0), N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(grad_out.size(1) == N, "fastpeft: grad_out must be [M, ", N, "], got ",
              grad_out.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == (scale_input ? K : N),
              "fastpeft: scale must be [", scale_input ? K : N, "], got ", scale.sizes());
  const bool has_unscaled = ia3_has_unscaled(unscaled);
  if (has_unscaled) {
    TORCH_CHECK(!scale_input, "fastpeft: unscaled is only used with scale_input=False");
    check_same_device_dtype(grad_out, unscaled, "unscaled", "grad_out");
    TORCH_CHECK(unscaled.size(0) == M && unscaled.size(1) == N, "fastpeft: unscaled must be [",
                M, ", ", N, "], got ", unscaled.sizes());
  }
  if (need_grad_weight || (need_grad_scale && !has_unscaled)) {
    check_same_device_dtype(grad_out, x, "x", "grad_out");
    TORCH_CHECK(x.dim() == 2 && x.size(0) == M && x.size(1) == K, "fastpeft: x must be [", M,
                ", ", K, "] (it is needed for grad_weight / grad_scale), got ", x.sizes());
  }
}

}  // namespace fastpeft
