// CUDA implementation of fastpeft::token_logprobs and its backward (semantics:
// csrc/torch_bindings.cpp).
//
// Forward: one thread block per row (a single warp for small vocabularies). Each thread reads
// its strided share of the row once (coalesced, 16-byte vector loads when the row allows) and
// keeps an online (m = max raw logit, s = sum exp(d), t = sum exp(d) d) with
// d = (z - m) / temperature, one exp per value; the threads' triples are merged by warp
// shuffles, then across warps through shared memory. Thread 0 writes
// logp = (z[token] - m) / T - log s, entropy = log s - t / s and the stats (m, log s, t / s).
// Backward: one block per row again, p = exp(d - log s) recomputed per value and
//   grad_logits = (-p (g_logp + g_entropy (d - t / s)) + g_logp onehot(token)) / T
// written in the logits' dtype. Accumulation in fp32 (fp64 for fp64).
// A token outside [0, V) is not checked on the host (that would cost a device sync per call):
// its row's logp is NaN and its backward has no one-hot term (documented in the wrapper).
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/token_logprobs_checks.h"
#include "ops.h"

namespace fastpeft {
namespace {

template <typename acc_t>
struct Online {
  acc_t m, s, t;
};

template <typename acc_t>
__device__ __forceinline__ acc_t dev_exp(acc_t x) {
  return exp(x);
}
template <>
__device__ __forceinline__ float dev_exp<float>(float x) {
  return expf(x);
}

// Adds one raw logit x to the running triple (kEntropy: t too).
template <bool kEntropy, typename acc_t>
__device__ __forceinline__ void online_add(Online<acc_t>& o, acc_t x, acc_t inv_t) {
  if (x == -std::numeric_limits<acc_t>::infinity()) return;  // probability 0
  if (x > o.m) {
    if (o.s > acc_t(0)) {
      const acc_t dm = (o.m - x) * inv_t;
      const acc_t alpha = dev_exp(dm);
      if constexpr (kEntropy) o.t = alpha * (o.t + o.s * dm);
      o.s = alpha * o.s;
    }
    o.s += acc_t(1);  // the new max itself: d = 0
    o.m = x;
  } else {
    const acc_t d = (x - o.m) * inv_t;
    const acc_t e = dev_exp(d);
    o.s += e;
    if constexpr (kEntropy) {
      if (e > acc_t(0)) o.t += e * d;
    }
  }
}

// Merges b into a.
template <bool kEntropy, typename acc_t>
__device__ __forceinline__ void online_merge(Online<acc_t>& a, const Online<acc_t>& b,
                                             acc_t inv_t) {
  if (b.s == acc_t(0)) return;
  if (a.s == acc_t(0)) {
    a = b;
    return;
  }
  const acc_t m = a.m > b.m ? a.m : b.m;
  const acc_t da = (a.m - m) * inv_t, db = (b.m - m) * inv_t;
  const acc_t ea = dev_exp(da), eb = dev_exp(db);
  if constexpr (kEntropy) a.t = ea * (a.t + a.s * da) + eb * (b.t + b.s * db);
  a.s = ea * a.s + eb * b.s;
  a.m = m;
}

template <bool kEntropy, typename acc_t>
__device__ __forceinline__ void warp_merge(Online<acc_t>& o, acc_t inv_t) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Online<acc_t> other;
    other.m = __shfl_xor_sync(0xffffffffu, o.m, off);
    other.s = __shfl_xor_sync(0xffffffffu, o.s, off);
    other.t = __shfl_xor_sync(0xffffffffu, o.t, off);
    online_merge<kEntropy>(o, other, inv_t);
  }
}

// Bytes per vector load of one thread (16) as a count of scalar_t.
template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

template <typename scalar_t>
struct alignas(16) Pack {
  scalar_t v[kVec<scalar_t>];
};

// Calls f(j, value) for every value of row [0, V) of this thread's share: vector loads when
// the row starts 16-byte aligned and V is a multiple of the vector width, else scalar.
template <typename scalar_t, typename F>
__device__ __forceinline__ void for_row(const scalar_t* row, int64_t V, bool vec, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kVec<scalar_t>;
  if (vec) {
    const Pack<scalar_t>* p = reinterpret_cast<const Pack<scalar_t>*>(row);
    for (int64_t k = threadIdx.x; k < V / W; k += blockDim.x) {
      const Pack<scalar_t> pk = p[k];
#pragma unroll
      for (int i = 0; i < W; ++i) f(k * W + i, static_cast<acc_t>(pk.v[i]));
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) f(j, static_cast<acc_t>(row[j]));
  }
}

template <typename scalar_t, bool kEntropy>
__global__ void token_logprobs_fwd_kernel(const scalar_t* __restrict__ logits,
                                          const int64_t* __restrict__ tokens, int64_t V,
                                          at::opmath_type<scalar_t> inv_t, bool vec,
                                          scalar_t* __restrict__ logp,
                                          scalar_t* __restrict__ entropy,
                                          at::opmath_type<scalar_t>* __restrict__ stats) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ Online<acc_t> warps[32];
  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + r * V;
  Online<acc_t> o{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
  for_row(row, V, vec, [&](int64_t, acc_t x) { online_add<kEntropy>(o, x, inv_t); });
  warp_merge<kEntropy>(o, inv_t);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  if (nwarps > 1) {
    if (lane == 0) warps[warp] = o;
    __syncthreads();
    if (warp == 0) {
      o = lane < nwarps ? warps[lane]
                        : Online<acc_t>{-std::numeric_limits<acc_t>::infinity(), acc_t(0),
                                        acc_t(0)};
      warp_merge<kEntropy>(o, inv_t);
    }
  }
  if (threadIdx.x == 0) {
    const acc_t log_s = log(o.s);  // -inf for a row of -inf: logp NaN, as log_softmax
    const acc_t ts = kEntropy ? o.t / o.s : acc_t(0);
    const int64_t tok = tokens[r];
    const acc_t zt = (tok >= 0 && tok < V) ? static_cast<acc_t>(row[tok])
                                           : std::numeric_limits<acc_t>::quiet_NaN();
    logp[r] = static_cast<scalar_t>((zt - o.m) * inv_t - log_s);
    if constexpr (kEntropy) entropy[r] = static_cast<scalar_t>(log_s - ts);
    stats[3 * r] = o.m;
    stats[3 * r + 1] = log_s;
    stats[3 * r + 2] = ts;
  }
}

template <typename scalar_t, bool kEntropy>
__global__ void token_logprobs_bwd_kernel(const scalar_t* __restrict__ grad_logp,
                                          const scalar_t* __restrict__ grad_entropy,
                                          const scalar_t* __restrict__ logits,
                                          const int64_t* __restrict__ tokens,
                                          const at::opmath_type<scalar_t>* __restrict__ stats,
                                          int64_t V, at::opmath_type<scalar_t> inv_t, bool vec,
                                          scalar_t* __restrict__ grad) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int W = kVec<scalar_t>;
  const int64_t r = blockIdx.x;
  const scalar_t* row = logits + r * V;
  scalar_t* out = grad + r * V;
  const acc_t m = stats[3 * r], log_s = stats[3 * r + 1], e = stats[3 * r + 2];
  const acc_t gl = static_cast<acc_t>(grad_logp[r]);
  const acc_t gh = kEntropy ? static_cast<acc_t>(grad_entropy[r]) : acc_t(0);
  const int64_t tok = tokens[r];
  auto value = [&](int64_t j, acc_t x) -> scalar_t {
    const acc_t d = (x - m) * inv_t;
    const acc_t p = dev_exp(d - log_s);
    acc_t coef = gl;
    if constexpr (kEntropy) coef += gh * (d - e);
    acc_t g = p > acc_t(0) ? -p * coef * inv_t : acc_t(0);  // -inf logits: 0, not 0 * inf
    if (j == tok) g += gl * inv_t;
    return static_cast<scalar_t>(g);
  };
  if (vec) {
    const Pack<scalar_t>* p = reinterpret_cast<const Pack<scalar_t>*>(row);
    Pack<scalar_t>* q = reinterpret_cast<Pack<scalar_t>*>(out);
    for (int64_t k = threadIdx.x; k < V / W; k += blockDim.x) {
      const Pack<scalar_t> pk = p[k];
      Pack<scalar_t> res;
#pragma unroll
      for (int i = 0; i < W; ++i) res.v[i] = value(k * W + i, static_cast<acc_t>(pk.v[i]));
      q[k] = res;
    }
  } else {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) {
      out[j] = value(j, static_cast<acc_t>(row[j]));
    }
  }
}

// Threads per row: one warp for small rows, up to 512 for large ones.
int threads_for(int64_t V) {
  if (V <= 512) return 32;
  if (V <= 4096) return 128;
  if (V <= 16384) return 256;
  return 512;
}

// 16-byte loads need the row starts aligned: V a multiple of the vector width and an aligned
// base pointer (the grad is allocated fresh, hence aligned).
bool can_vectorize(const at::Tensor& logits) {
  const int64_t w = 16 / logits.element_size();
  return logits.size(1) % w == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
}

void check_cuda_rows(const at::Tensor& logits) {
  check_cuda_input(logits, "token_logprobs");
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(),
              "fastpeft: token_logprobs (CUDA) takes at most 2^31 - 1 rows, got ", logits.size(0));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits_in,
                                                                   const at::Tensor& tokens_in,
                                                                   double temperature,
                                                                   bool return_entropy) {
  check_token_logprobs_args(logits_in, tokens_in, temperature);
  check_cuda_rows(logits_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor logp = at::empty({N}, logits.options());
  at::Tensor entropy = at::empty({return_entropy ? N : 0}, logits.options());
  at::Tensor stats = at::empty({N, 3}, logits.options().dtype(acc));
  if (N == 0) return {logp, entropy, stats};
  const int threads = threads_for(V);
  const bool vec = can_vectorize(logits);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
        auto launch = [&](auto kernel) {
          kernel<<<static_cast<unsigned>(N), threads, 0, stream>>>(
              logits.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), V, inv_t, vec,
              logp.data_ptr<scalar_t>(),
              return_entropy ? entropy.data_ptr<scalar_t>() : nullptr, stats.data_ptr<acc_t>());
        };
        if (return_entropy) {
          launch(token_logprobs_fwd_kernel<scalar_t, true>);
        } else {
          launch(token_logprobs_fwd_kernel<scalar_t, false>);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return {logp, entropy, stats};
}

at::Tensor token_logprobs_backward_cuda(const at::Tensor& grad_logp_in,
                                        const std::optional<at::Tensor>& grad_entropy_in,
                                        const at::Tensor& logits_in, const at::Tensor& tokens_in,
                                        const at::Tensor& stats_in, double temperature) {
  check_token_logprobs_backward_args(grad_logp_in, grad_entropy_in, logits_in, tokens_in,
                                     stats_in, temperature);
  check_cuda_rows(logits_in);
  at::AutoDispatchBelowADInplaceOrView guard;
  c10::cuda::CUDAGuard device_guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor tokens = tokens_in.contiguous();
  const at::Tensor grad_logp = grad_logp_in.contiguous();
  const at::Tensor stats = stats_in.contiguous();
  const bool has_ge = grad_entropy_in.has_value();
  const at::Tensor grad_entropy = has_ge ? grad_entropy_in->contiguous() : at::Tensor();
  const int64_t N = logits.size(0), V = logits.size(1);
  at::Tensor grad = at::empty({N, V}, logits.options());
  if (N == 0) return grad;
  const int threads = threads_for(V);
  const bool vec = can_vectorize(logits);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, logits.scalar_type(), "token_logprobs_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
        auto launch = [&](auto kernel) {
          kernel<<<static_cast<unsigned>(N), threads, 0, stream>>>(
              grad_logp.data_ptr<scalar_t>(),
              has_ge ? grad_entropy.data_ptr<scalar_t>() : nullptr,
              logits.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), stats.data_ptr<acc_t>(),
              V, inv_t, vec, grad.data_ptr<scalar_t>());
        };
        if (has_ge) {
          launch(token_logprobs_bwd_kernel<scalar_t, true>);
        } else {
          launch(token_logprobs_bwd_kernel<scalar_t, false>);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad;
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CUDA, m) {
  m.impl("token_logprobs", &fastpeft::token_logprobs_cuda);
  m.impl("token_logprobs_backward", &fastpeft::token_logprobs_backward_cuda);
}
