// Helpers of the CPU ia3_linear and adapter_bottleneck kernels: per-thread column sums over
// row ranges, and small conversions to the accumulation type.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

namespace fastpeft::cpu {

// Rows per parallel chunk of a pass over [M, width]: enough work (~16K elements) per task
// for the threads to pay off, so small M runs on one thread.
inline int64_t pass_grain(int64_t width) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
}

// A pass over rows [0, M) in parallel whose results are column sums: body(m0, m1, acc) runs
// rows [m0, m1) and adds into acc [width] (the calling thread's partial, zeroed before its
// first chunk). Returns the sum of the threads' partials. Each thread reads its own rows
// once, whatever else body does with them (e.g. writes a gradient in the same pass).
template <typename op_t, typename Body>
std::vector<op_t> parallel_column_sums(int64_t M, int64_t width, int64_t grain,
                                       const Body& body) {
  const int64_t nthreads = std::max<int64_t>(at::get_num_threads(), 1);
  std::vector<op_t> parts(static_cast<size_t>(nthreads * width), op_t(0));
  at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), nthreads - 1);
    body(m0, m1, parts.data() + tid * width);
  });
  for (int64_t t = 1; t < nthreads; ++t) {
    const op_t* p = parts.data() + t * width;
    for (int64_t i = 0; i < width; ++i) parts[i] += p[i];
  }
  parts.resize(static_cast<size_t>(width));
  return parts;
}

// A contiguous tensor's values in the accumulation type op_t (a copy).
template <typename op_t, typename scalar_t>
std::vector<op_t> opmath_vector(const at::Tensor& t) {
  const scalar_t* p = t.data_ptr<scalar_t>();
  std::vector<op_t> v(static_cast<size_t>(t.numel()));
  for (int64_t i = 0; i < t.numel(); ++i) v[i] = static_cast<op_t>(p[i]);
  return v;
}

// A 1-D tensor of `dtype` holding v.
template <typename op_t>
at::Tensor vector_to_tensor(const std::vector<op_t>& v, const at::TensorOptions& options) {
  at::Tensor out = at::empty({static_cast<int64_t>(v.size())}, options);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "vector_to_tensor", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) o[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

}  // namespace fastpeft::cpu
