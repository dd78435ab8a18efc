// CUDA linear_cross_entropy and linear_token_logprobs (semantics: csrc/torch_bindings.cpp; the
// chunk loop and its cuBLAS GEMMs: common/linear_cross_entropy.h). What is here is the fused
// row pass over each chunk's logits [n, V]: one thread block per row, fp32 arithmetic for
// fp16 / bf16 (fp64 for fp64).
//   stats: one read of the row with an online max / sum-exp per thread, a block reduction of
//          the (max, sum) pairs; thread 0 writes lse and log p(target).
//   grad:  one read and one write of the row: z <- coef * (exp(z / T - lse) - onehot).
#include <limits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/linear_cross_entropy.h"
#include "ops.h"

namespace fastpeft {
namespace {

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log(float x) { return logf(x); }
__device__ __forceinline__ double dev_log(double x) { return log(x); }

// (m, s) <- the pair for the union of the sets (m, s) and (m2, s2) summarize:
// max and sum of exp(v - max).
template <typename acc_t>
__device__ __forceinline__ void merge(acc_t& m, acc_t& s, acc_t m2, acc_t s2) {
  const acc_t mx = m > m2 ? m : m2;
  if (mx == -std::numeric_limits<acc_t>::infinity()) return;  // both empty
  s = s * dev_exp(m - mx) + s2 * dev_exp(m2 - mx);
  m = mx;
}

// Every thread of the block gets the block's (max, sum-exp).
template <typename acc_t>
__device__ __forceinline__ void block_merge(acc_t& m, acc_t& s) {
  __shared__ acc_t sm[32], ss[32];
  for (int off = 16; off > 0; off /= 2) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nwarps = (blockDim.x + 31) / 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < nwarps ? sm[lane] : -std::numeric_limits<acc_t>::infinity();
    s = lane < nwarps ? ss[lane] : acc_t(0);
    for (int off = 16; off > 0; off /= 2) {
      merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
    }
    if (lane == 0) {
      sm[0] = m;
      ss[0] = s;
    }
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
}

template <typename scalar_t, typename acc_t>
__global__ void stats_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ targets,
                             int64_t V, int64_t ignore_index, acc_t inv_temp,
                             acc_t* __restrict__ logp, acc_t* __restrict__ lse) {
  const int64_t row = blockIdx.x;
  const scalar_t* x = z + row * V;
  acc_t m = -std::numeric_limits<acc_t>::infinity(), s = 0;
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(x[i]) * inv_temp;
    if (v > m) {
      s = s * dev_exp(m - v) + acc_t(1);
      m = v;
    } else {
      s += dev_exp(v - m);
    }
  }
  block_merge(m, s);
  if (threadIdx.x == 0) {
    const acc_t l = m + dev_log(s);
    lse[row] = l;
    const int64_t t = targets[row];
    logp[row] = (t == ignore_index || t < 0 || t >= V)
                    ? acc_t(0)
                    : static_cast<acc_t>(x[t]) * inv_temp - l;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void grad_kernel(scalar_t* __restrict__ z, const int64_t* __restrict__ targets,
                            const acc_t* __restrict__ lse, const acc_t* __restrict__ coef,
                            int64_t V, acc_t inv_temp) {
  const int64_t row = blockIdx.x;
  scalar_t* x = z + row * V;
  const acc_t c = coef[row], l = lse[row];
  const int64_t t = targets[row];
  if (c == acc_t(0)) {  // ignored row (or zero grad_out): no gradient
    for (int64_t i = threadIdx.x; i < V; i += blockDim.x) x[i] = scalar_t(0);
    return;
  }
  for (int64_t i = threadIdx.x; i < V; i += blockDim.x) {
    const acc_t p = dev_exp(static_cast<acc_t>(x[i]) * inv_temp - l);
    x[i] = static_cast<scalar_t>(c * (i == t ? p - acc_t(1) : p));
  }
}

int threads_for(int64_t V) { return V >= 16384 ? 1024 : (V >= 2048 ? 256 : 128); }

struct CudaRows {
  static void stats(const at::Tensor& z, const at::Tensor& targets, int64_t ignore_index,
                    double inv_temp, at::Tensor& logp, at::Tensor& lse) {
    const int64_t n = z.size(0), V = z.size(1);
    if (n == 0) return;
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lce_stats_cuda",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      stats_kernel<scalar_t, acc_t><<<n, threads_for(V), 0, stream>>>(
          z.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), V, ignore_index,
          static_cast<acc_t>(inv_temp), logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void grad(at::Tensor& z, const at::Tensor& targets, const at::Tensor& lse,
                   const at::Tensor& coef, double inv_temp) {
    const int64_t n = z.size(0), V = z.size(1);
    if (n == 0) return;
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "lce_grad_cuda",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      grad_kernel<scalar_t, acc_t><<<n, threads_for(V), 0, stream>>>(
          z.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(), lse.data_ptr<acc_t>(),
          coef.data_ptr<acc_t>(), V, static_cast<acc_t>(inv_temp));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

void check_cuda(const Tensor& hidden, const char* op) {
  TORCH_CHECK(hidden.is_cuda(), "fastpeft: ", op, " needs CUDA tensors, got hidden on ",
              hidden.device());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> linear_cross_entropy_cuda(
    const Tensor& hidden, const Tensor& weight, const Tensor& labels, int64_t ignore_index,
    std::optional<int64_t> chunk_size, std::array<bool, 2> grad_mask) {
  check_cuda(hidden, "linear_cross_entropy_cuda");
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  lce::check_args(hidden, weight, labels, "labels", ignore_index);
  at::AutoDispatchBelowADInplaceOrView guard;
  return lce::cross_entropy_forward<CudaRows>(hidden.contiguous(), weight.contiguous(),
                                              labels.contiguous(), ignore_index, chunk_size,
                                              grad_mask);
}

std::tuple<Tensor, Tensor> linear_cross_entropy_backward_cuda(const Tensor& grad_loss,
                                                              const Tensor& grad_hidden,
                                                              const Tensor& grad_weight,
                                                              std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard device_guard(grad_loss.device());
  at::AutoDispatchBelowADInplaceOrView guard;
  return lce::cross_entropy_backward(grad_loss, grad_hidden, grad_weight, output_mask);
}

std::tuple<Tensor, Tensor> linear_token_logprobs_cuda(const Tensor& hidden, const Tensor& weight,
                                                      const Tensor& tokens, double temperature,
                                                      std::optional<int64_t> chunk_size) {
  check_cuda(hidden, "linear_token_logprobs_cuda");
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  lce::check_args(hidden, weight, tokens, "tokens", std::nullopt);
  at::AutoDispatchBelowADInplaceOrView guard;
  return lce::token_logprobs_forward<CudaRows>(hidden.contiguous(), weight.contiguous(),
                                               tokens.contiguous(), temperature, chunk_size);
}

std::tuple<Tensor, Tensor> linear_token_logprobs_backward_cuda(
    const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& tokens,
    const Tensor& lse, double temperature, std::optional<int64_t> chunk_size,
    std::array<bool, 2> output_mask) {
  check_cuda(hidden, "linear_token_logprobs_backward_cuda");
  const c10::cuda::CUDAGuard device_guard(hidden.device());
  lce::check_args(hidden, weight, tokens, "tokens", std::nullopt);
  at::AutoDispatchBelowADInplaceOrView guard;
  return lce::token_logprobs_backward<CudaRows>(grad_out.contiguous(), hidden.contiguous(),
                                                weight.contiguous(), tokens.contiguous(), lse,
                                                temperature, chunk_size, output_mask);
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("linear_cross_entropy", &fastpeft::linear_cross_entropy_cuda);
  m.impl("linear_cross_entropy_backward", &fastpeft::linear_cross_entropy_backward_cuda);
  m.impl("linear_token_logprobs", &fastpeft::linear_token_logprobs_cuda);
  m.impl("linear_token_logprobs_backward", &fastpeft::linear_token_logprobs_backward_cuda);
}
