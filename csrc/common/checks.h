// Input checks shared by every op's CPU and CUDA kernels (host code). Every message names the
// argument, what was expected and what was given.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastpeft {

inline void check_same_device_dtype(const at::Tensor& ref, const at::Tensor& t,
                                    const char* name, const char* ref_name = "x") {
  TORCH_CHECK(t.device() == ref.device(), "fastpeft: ", name, " must be on ", ref.device(),
              " like ", ref_name, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "fastpeft: ", name, " must have dtype ",
              ref.scalar_type(), " like ", ref_name, ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "fastpeft: ", name, " must be ", dim, "-D ", layout, ", got shape ",
              t.sizes());
}

// A 1-D [n] tensor like ref (device and dtype), when given.
inline void check_optional_vector(const at::Tensor& ref, const std::optional<at::Tensor>& t,
                                  int64_t n, const char* name, const char* what) {
  if (!t.has_value()) return;
  check_same_device_dtype(ref, *t, name);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fastpeft: ", name, " must be [", n, "] (", what,
              "), got ", t->sizes());
}

// x on a CUDA device, in a dtype the CUDA kernels take (float64 too, for tests against
// the CPU kernels).
inline void check_cuda_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), "fastpeft: ", op, " (CUDA) expects x on a CUDA device, got ",
              x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "fastpeft: ", op, " (CUDA) supports float32, bfloat16 and float16 x, got ", dt);
}

}  // namespace fastpeft
