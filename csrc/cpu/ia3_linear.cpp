// CPU ia3_linear forward and backward (semantics: csrc/torch_bindings.cpp, csrc/ops.h).
//
// The GEMMs go to ATen (MKL / oneDNN). The IA3 vector l is applied where it costs least, and
// never to a copy of x:
//  - for M of at least 32 rows per thread, in row blocks (see block_rows): each thread runs
//    single-threaded GEMMs on its blocks and scales a block of x or grad_out into a small
//    per-thread buffer, or a block of the GEMM's result in place, forming the column sums
//    grad_scale / grad_bias need from the same rows while they are in cache;
//  - below that, on whole matrices with multi-threaded GEMMs: folded into a transient copy of
//    W (scaled over K or N), into a small buffer of scaled rows (M * width <= kSmallBuffer), or
//    on a GEMM's output in one parallel pass that also forms the column sums (per-thread
//    partial sums, reduced at the end).
// The grad_weight GEMMs (g^T x) are whole-matrix.
// The elementwise passes compute in the accumulation type (fp32 for bf16, fp64 for fp64).
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/ia3_linear_checks.h"
#include "ops.h"

namespace fastpeft {
namespace {

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

// The row loops of the passes, vectorised: fp32 / fp64 get clones for x86-64-v4 (AVX-512),
// AVX2 and the baseline (the extension is built for the baseline ISA), bf16 the generic loop.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define FASTPEFT_IA3_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FASTPEFT_IA3_CLONES
#endif

// d[i] = s[i] * (l ? l[i] : f)  (d may be s).
template <typename T, typename op_t>
inline void scale_row_body(const T* s, T* d, const op_t* l, op_t f, int64_t n) {
  if (l != nullptr) {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(static_cast<op_t>(s[i]) * l[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<T>(static_cast<op_t>(s[i]) * f);
  }
}
// acc[i] += x[i] * g[i]; and g[i] *= l[i] when l (scale_input's grad_scale / grad_x pass).
template <typename T, typename op_t>
inline void grad_row_body(T* g, const T* x, const op_t* l, op_t* acc, int64_t n) {
  if (l != nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const op_t v = static_cast<op_t>(g[i]);
      acc[i] += static_cast<op_t>(x[i]) * v;
      g[i] = static_cast<T>(v * l[i]);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) acc[i] += static_cast<op_t>(x[i]) * static_cast<op_t>(g[i]);
  }
}
// prod[i] += g[i] * u[i] (when prod) and sum[i] += g[i] (when sum).
template <typename T, typename op_t>
inline void sums_row_body(const T* g, const T* u, op_t* prod, op_t* sum, int64_t n) {
  if (prod != nullptr)
    for (int64_t i = 0; i < n; ++i) prod[i] += static_cast<op_t>(g[i]) * static_cast<op_t>(u[i]);
  if (sum != nullptr)
    for (int64_t i = 0; i < n; ++i) sum[i] += static_cast<op_t>(g[i]);
}

#define FASTPEFT_IA3_ROW_KERNELS(T, op_t)                                                      \
  FASTPEFT_IA3_CLONES void scale_row(const T* s, T* d, const op_t* l, op_t f, int64_t n) {     \
    scale_row_body<T, op_t>(s, d, l, f, n);                                                    \
  }                                                                                            \
  FASTPEFT_IA3_CLONES void grad_row(T* g, const T* x, const op_t* l, op_t* acc, int64_t n) {   \
    grad_row_body<T, op_t>(g, x, l, acc, n);                                                   \
  }                                                                                            \
  FASTPEFT_IA3_CLONES void sums_row(const T* g, const T* u, op_t* prod, op_t* sum, int64_t n) { \
    sums_row_body<T, op_t>(g, u, prod, sum, n);                                                \
  }
FASTPEFT_IA3_ROW_KERNELS(float, float)
FASTPEFT_IA3_ROW_KERNELS(double, double)
#undef FASTPEFT_IA3_ROW_KERNELS
void scale_row(const at::BFloat16* s, at::BFloat16* d, const float* l, float f, int64_t n) {
  scale_row_body<at::BFloat16, float>(s, d, l, f, n);
}
void grad_row(at::BFloat16* g, const at::BFloat16* x, const float* l, float* acc, int64_t n) {
  grad_row_body<at::BFloat16, float>(g, x, l, acc, n);
}
void sums_row(const at::BFloat16* g, const at::BFloat16* u, float* prod, float* sum, int64_t n) {
  sums_row_body<at::BFloat16, float>(g, u, prod, sum, n);
}

// Up to this many elements a scaled copy of a few rows of x (or grad_out) is a small buffer
// (256 KB in fp32), cheaper than scaling all of W when M is this small.
constexpr int64_t kSmallBuffer = 1 << 16;

Tensor affine(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  return bias.has_value() ? at::addmm(*bias, x, w.t()) : at::mm(x, w.t());
}

// out = a w^T (+ bias), into out (a row block of the result).
void affine_out(Tensor& out, const Tensor& a, const Tensor& w, const std::optional<Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(out, *bias, a, w.t());
  } else {
    at::mm_out(out, a, w.t());
  }
}

// Row blocks: for M large enough, forward and backward run over blocks of rows, each thread
// taking a contiguous range of blocks and calling single-threaded GEMMs on its blocks (MKL runs
// them on one thread inside at::parallel_for: MKL_VERBOSE shows NThr:1), and the IA3 scaling
// and column sums touch a block of a GEMM's operand or result while it is still in cache: no
// transient copy of W, no second pass over [M, N] / [M, K]. Blocks of up to 256 rows (in this
// machine's 32 MB L3, not its 1 MB L2): blocks sized for L2 (256 KB: ~110 rows of 576 fp32
// values, 32-48 of 1536) made the per-block GEMMs slower than the passes they save; 128-384
// rows measured alike. Against the whole-matrix paths (fp32, 2 threads, forward+backward,
// M = 1024, interleaved medians): 3-6% less time for scale_input=False, within +-1% (noise)
// for scale_input=True. Each block's GEMM reads all of W: with a W of 2048 x 2048 fp32
// (16 MB, M = 4096) blocks measured ~1.5% slower, so above kMaxBlockWeightBytes, and below
// kMinBlockRows rows per thread, the whole-matrix paths (multi-threaded GEMMs) are used.
constexpr int64_t kMinBlockRows = 32;
constexpr int64_t kMaxBlockWeightBytes = int64_t(8) << 20;
constexpr int64_t kMaxBlockRows = 256;
constexpr int64_t kBlockBytes = int64_t(2) << 20;  // a block of the widest row-block operand

// Rows per block for an [N, K] weight, or 0 when M is too small or W too large for blocks.
inline int64_t block_rows(int64_t M, int64_t N, int64_t K, int64_t elem_size) {
  const int64_t nthreads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t per_thread = (M + nthreads - 1) / nthreads;
  if (per_thread < kMinBlockRows || N * K * elem_size > kMaxBlockWeightBytes ||
      at::in_parallel_region())
    return 0;
  // The widest row-block operand is a block of x / grad_x (K) or of y / grad_out (N).
  int64_t rows = kBlockBytes / std::max<int64_t>(std::max(K, N) * elem_size, 1);
  rows = std::max<int64_t>(2 * kMinBlockRows, std::min<int64_t>(rows, kMaxBlockRows));
  // Whole blocks per thread where possible (no thread left with a sliver).
  const int64_t nblocks = (per_thread + rows - 1) / rows * nthreads;
  return (M + nblocks - 1) / nblocks;
}

// Runs body(m0, m1, acc) over the row blocks [m0, m1) of [0, M) (`rows` each, the last one
// shorter) in parallel, acc as in parallel_column_sums ([width] per thread); returns the
// column sums.
template <typename op_t, typename Body>
std::vector<op_t> row_blocks(int64_t M, int64_t rows, int64_t width, const Body& body) {
  const int64_t nblocks = (M + rows - 1) / rows;
  return parallel_column_sums<op_t>(nblocks, width, 1, [&](int64_t b0, int64_t b1, op_t* acc) {
    // (Thread-local: the caller's guard does not reach the pool's threads.)
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t b = b0; b < b1; ++b) body(b * rows, std::min(M, (b + 1) * rows), acc);
  });
}

// dst [rows, cols] = src * l[None, :] (by_col, l [cols]) or src * l[:, None] (l [rows]);
// dst may be src.
template <typename scalar_t, typename op_t>
void scale_matrix(const Tensor& src, const op_t* l, bool by_col, Tensor& dst) {
  const int64_t rows = src.size(0), cols = src.size(1);
  const scalar_t* S = src.data_ptr<scalar_t>();
  scalar_t* D = dst.data_ptr<scalar_t>();
  at::parallel_for(0, rows, pass_grain(cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      scale_row(S + r * cols, D + r * cols, by_col ? l : nullptr, by_col ? op_t(0) : l[r], cols);
  });
}

// An uninitialised [rows, cols] tensor in a buffer this thread reuses across calls: a fresh
// multi-MB allocation page-faults on every call (~0.1 ms per MB here, as much as the pass that
// fills it). Valid until this thread's next call. The buffer (at most kMaxCachedBytes) lives as
// long as the thread; larger requests are plain allocations.
Tensor transient(int64_t rows, int64_t cols, const at::TensorOptions& options) {
  constexpr int64_t kMaxCachedBytes = int64_t(32) << 20;
  const int64_t bytes = rows * cols * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes > kMaxCachedBytes) return at::empty({rows, cols}, options);
  thread_local Tensor cache;
  if (!cache.defined() || cache.numel() < bytes)
    cache = at::empty({bytes}, options.dtype(at::kByte));
  return cache.narrow(0, 0, bytes).view(options.dtype().toScalarType()).view({rows, cols});
}

// src scaled by l (see scale_matrix) into a transient buffer (an operand of the next GEMM
// only, never an output).
template <typename scalar_t, typename op_t>
Tensor scaled(const Tensor& src, const op_t* l, bool by_col) {
  Tensor dst = transient(src.size(0), src.size(1), src.options());
  scale_matrix<scalar_t, op_t>(src, l, by_col, dst);
  return dst;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& weight,
                                        const std::optional<Tensor>& bias, const Tensor& scale,
                                        bool scale_input, bool keep_unscaled) {
  using op_t = at::opmath_type<scalar_t>;
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const std::vector<op_t> l = opmath_vector<op_t, scalar_t>(scale);
  Tensor unscaled = x.new_empty({0});
  Tensor y;
  const int64_t rows = block_rows(M, N, K, x.element_size());
  if (rows > 0) {
    // Per row block: y = (x * l) W^T + b from a per-thread scaled copy of the block, or
    // u = x W^T + b and then y = u * l while u is in cache.
    y = at::empty({M, N}, x.options());
    const bool with_unscaled = !scale_input && keep_unscaled;
    if (with_unscaled) unscaled = at::empty({M, N}, x.options());
    const scalar_t* X = x.data_ptr<scalar_t>();
    row_blocks<op_t>(M, rows, 0, [&](int64_t m0, int64_t m1, op_t*) {
      Tensor yb = y.narrow(0, m0, m1 - m0);
      if (scale_input) {
        Tensor xs = transient(m1 - m0, K, x.options());
        scalar_t* XS = xs.data_ptr<scalar_t>();
        for (int64_t m = m0; m < m1; ++m)
          scale_row(X + m * K, XS + (m - m0) * K, l.data(), op_t(0), K);
        affine_out(yb, xs, weight, bias);
      } else {
        Tensor ub = with_unscaled ? unscaled.narrow(0, m0, m1 - m0) : yb;
        affine_out(ub, x.narrow(0, m0, m1 - m0), weight, bias);
        const scalar_t* U = ub.data_ptr<scalar_t>();
        scalar_t* Y = yb.data_ptr<scalar_t>();
        for (int64_t m = 0; m < m1 - m0; ++m)
          scale_row(U + m * N, Y + m * N, l.data(), op_t(0), N);
      }
    });
  } else if (scale_input) {
    // y = (x * l) W^T + b = x (W * l[None, :])^T + b.
    if (M * K <= kSmallBuffer) {
      y = affine(scaled<scalar_t>(x, l.data(), /*by_col=*/true), weight, bias);
    } else {
      y = affine(x, scaled<scalar_t>(weight, l.data(), /*by_col=*/true), bias);
    }
  } else if (keep_unscaled) {
    // unscaled = x W^T + b (kept for grad_scale); y = unscaled * l[None, :].
    unscaled = affine(x, weight, bias);
    y = at::empty_like(unscaled);
    scale_matrix<scalar_t, op_t>(unscaled, l.data(), /*by_col=*/true, y);
  } else if (M > K) {
    // y = x (l[:, None] * W)^T + l * b: scaling W (N x K) is cheaper than scaling y (M x N).
    std::optional<Tensor> bias_l;
    if (bias.has_value()) {
      bias_l = bias->view({1, N}).clone();
      scale_matrix<scalar_t, op_t>(*bias_l, l.data(), /*by_col=*/true, *bias_l);
      bias_l = bias_l->view({N});
    }
    y = affine(x, scaled<scalar_t>(weight, l.data(), /*by_col=*/false), bias_l);
  } else {
    y = affine(x, weight, bias);
    scale_matrix<scalar_t, op_t>(y, l.data(), /*by_col=*/true, y);
  }
  return {y, unscaled};
}

// scale_input, given gW = grad_out W [M, K] (the gradient of x * l): returns
// grad_scale = sum_rows(x * gW) and, when write_grad_x, turns gW into grad_x = gW * l in the
// same pass over [M, K].
template <typename scalar_t, typename op_t>
std::vector<op_t> scale_input_pass(Tensor& gw, const Tensor& x, const op_t* l,
                                   bool write_grad_x) {
  const int64_t M = gw.size(0), K = gw.size(1);
  scalar_t* GW = gw.data_ptr<scalar_t>();
  const scalar_t* X = x.data_ptr<scalar_t>();
  return parallel_column_sums<op_t>(M, K, pass_grain(K), [&](int64_t m0, int64_t m1, op_t* acc) {
    for (int64_t m = m0; m < m1; ++m)
      grad_row(GW + m * K, X + m * K, write_grad_x ? l : nullptr, acc, K);
  });
}

// Column sums of grad_out [M, N] in one pass: [sum_rows(g * u) when u, sum_rows(g) when
// with_sum], concatenated.
template <typename scalar_t, typename op_t>
std::vector<op_t> grad_out_column_sums(const Tensor& g, const Tensor* u, bool with_sum) {
  const int64_t M = g.size(0), N = g.size(1);
  const scalar_t* G = g.data_ptr<scalar_t>();
  // (Flags, not data pointers: an empty tensor's data pointer may be null.)
  const bool with_prod = u != nullptr;
  const scalar_t* U = with_prod ? u->data_ptr<scalar_t>() : nullptr;
  const int64_t width = (with_prod ? N : 0) + (with_sum ? N : 0);
  return parallel_column_sums<op_t>(M, width, pass_grain(N), [&](int64_t m0, int64_t m1,
                                                                  op_t* acc) {
    op_t* prod = with_prod ? acc : nullptr;
    op_t* sum = with_sum ? acc + (with_prod ? N : 0) : nullptr;
    for (int64_t m = m0; m < m1; ++m)
      sums_row(G + m * N, with_prod ? U + m * N : nullptr, prod, sum, N);
  });
}

template <typename scalar_t>
Grads4 backward_impl(const Tensor& g, const Tensor& x, const Tensor& weight,
                     const std::optional<Tensor>& bias, const Tensor& scale,
                     const Tensor& unscaled, bool scale_input, std::array<bool, 4> mask) {
  using op_t = at::opmath_type<scalar_t>;
  const bool need_gx = mask[0], need_gw = mask[1], need_gb = mask[2], need_gl = mask[3];
  const int64_t M = g.size(0), N = g.size(1), K = weight.size(1);
  const std::vector<op_t> l = opmath_vector<op_t, scalar_t>(scale);
  const auto opts = g.options();
  // A masked-off output is its own empty tensor (outputs of an op must not alias).
  Tensor grad_x = g.new_empty({0}), grad_w = g.new_empty({0}), grad_b = g.new_empty({0});
  Tensor grad_l = g.new_empty({0});

  const scalar_t* Gd = g.data_ptr<scalar_t>();
  const int64_t rows = need_gx || (scale_input && need_gl)
                           ? block_rows(M, N, K, g.element_size()) : 0;
  // The column sums a row-block pass returns, split: [0, n0) and [n0, end).
  auto split = [&](std::vector<op_t>& sums, int64_t n0, std::vector<op_t>& tail) {
    tail.assign(sums.begin() + n0, sums.end());
    sums.resize(static_cast<size_t>(n0));
  };

  if (scale_input && rows > 0) {
    // Per row block: gW = g W, then while it is in cache grad_scale += colsum(x * gW),
    // grad_x = gW * l (in place) and grad_bias += colsum(g).
    if (need_gx) grad_x = at::empty({M, K}, opts);
    const scalar_t* X = need_gl ? x.data_ptr<scalar_t>() : nullptr;
    const int64_t width_l = need_gl ? K : 0;
    std::vector<op_t> sums = row_blocks<op_t>(M, rows, width_l + (need_gb ? N : 0),
                                              [&](int64_t m0, int64_t m1, op_t* acc) {
      const int64_t mb = m1 - m0;
      Tensor gw = need_gx ? grad_x.narrow(0, m0, mb) : transient(mb, K, opts);
      at::mm_out(gw, g.narrow(0, m0, mb), weight);
      scalar_t* GW = gw.data_ptr<scalar_t>();
      for (int64_t m = 0; m < mb; ++m) {
        if (need_gl) {
          grad_row(GW + m * K, X + (m0 + m) * K, need_gx ? l.data() : nullptr, acc, K);
        } else {
          scale_row(GW + m * K, GW + m * K, l.data(), op_t(0), K);
        }
        if (need_gb) sums_row(Gd + (m0 + m) * N, nullptr, nullptr, acc + width_l, N);
      }
    });
    std::vector<op_t> colsum;
    split(sums, width_l, colsum);
    if (need_gl) grad_l = vector_to_tensor(sums, opts);
    if (need_gb) grad_b = vector_to_tensor(colsum, opts);
    if (need_gw) {
      grad_w = at::mm(g.t(), x);
      scale_matrix<scalar_t, op_t>(grad_w, l.data(), /*by_col=*/true, grad_w);
    }
    return {grad_x, grad_w, grad_b, grad_l};
  }
  if (scale_input) {
    if (need_gl) {
      // gW = g W, then one pass: grad_scale = sum_rows(x * gW), grad_x = gW * l (in place).
      Tensor gw = at::mm(g, weight);
      grad_l = vector_to_tensor(scale_input_pass<scalar_t, op_t>(gw, x, l.data(), need_gx), opts);
      if (need_gx) grad_x = gw;
    } else if (need_gx) {
      // grad_x = g (W * l[None, :]) or (g W) * l, whichever scales fewer elements.
      if (N < M) {
        grad_x = at::mm(g, scaled<scalar_t>(weight, l.data(), /*by_col=*/true));
      } else {
        grad_x = at::mm(g, weight);
        scale_matrix<scalar_t, op_t>(grad_x, l.data(), /*by_col=*/true, grad_x);
      }
    }
    if (need_gw) {
      // grad_weight = g^T (x * l) = (g^T x) * l[None, :].
      grad_w = at::mm(g.t(), x);
      scale_matrix<scalar_t, op_t>(grad_w, l.data(), /*by_col=*/true, grad_w);
    }
    if (need_gb)
      grad_b = vector_to_tensor(grad_out_column_sums<scalar_t, op_t>(g, nullptr, true), opts);
    return {grad_x, grad_w, grad_b, grad_l};
  }

  // !scale_input: gs = g * l[None, :] is formed only a row block (or a few rows) at a time.
  const bool has_unscaled = ia3_has_unscaled(unscaled);
  const bool with_prod = need_gl && has_unscaled;  // grad_scale = sum_rows(g * unscaled)
  const bool need_colsum = need_gb || (need_gl && !has_unscaled && bias.has_value());
  std::vector<op_t> prod;    // sum_rows(g * unscaled), when with_prod
  std::vector<op_t> colsum;  // sum_rows(g), when need_colsum
  bool sums_done = false;
  if (need_gx && rows > 0) {
    // Per row block: gs = g * l into a per-thread buffer (with the column sums of g * unscaled
    // and g from the same rows), then grad_x = gs W.
    grad_x = at::empty({M, K}, opts);
    const scalar_t* U = with_prod ? unscaled.data_ptr<scalar_t>() : nullptr;
    const int64_t width_p = with_prod ? N : 0;
    prod = row_blocks<op_t>(M, rows, width_p + (need_colsum ? N : 0),
                            [&](int64_t m0, int64_t m1, op_t* acc) {
      const int64_t mb = m1 - m0;
      Tensor gs = transient(mb, N, opts);
      scalar_t* GS = gs.data_ptr<scalar_t>();
      for (int64_t m = m0; m < m1; ++m) {
        scale_row(Gd + m * N, GS + (m - m0) * N, l.data(), op_t(0), N);
        if (with_prod || need_colsum)
          sums_row(Gd + m * N, with_prod ? U + m * N : nullptr, with_prod ? acc : nullptr,
                   need_colsum ? acc + width_p : nullptr, N);
      }
      Tensor gxb = grad_x.narrow(0, m0, mb);
      at::mm_out(gxb, gs, weight);
    });
    split(prod, width_p, colsum);
    sums_done = true;
  } else if (need_gx) {
    if (M * N <= kSmallBuffer) {
      grad_x = at::mm(scaled<scalar_t>(g, l.data(), /*by_col=*/true), weight);
    } else {
      grad_x = at::mm(g, scaled<scalar_t>(weight, l.data(), /*by_col=*/false));
    }
  }
  if (!sums_done && (with_prod || need_colsum)) {
    // One pass over g: [sum_rows(g * unscaled)], [sum_rows(g)].
    prod = grad_out_column_sums<scalar_t, op_t>(g, with_prod ? &unscaled : nullptr,
                                                need_colsum);
    split(prod, with_prod ? N : 0, colsum);
  }
  Tensor G;  // g^T x [N, K], when formed
  if (with_prod) {
    grad_l = vector_to_tensor(prod, opts);
  } else if (need_gl) {
    // grad_scale[n] = sum_k G[n, k] W[n, k] + b[n] sum_rows(g)[n]  (G = g^T x).
    G = at::mm(g.t(), x);
    const scalar_t* Gp = G.data_ptr<scalar_t>();
    const scalar_t* Wp = weight.data_ptr<scalar_t>();
    const bool has_bias = bias.has_value();
    const scalar_t* Bp = has_bias ? bias->data_ptr<scalar_t>() : nullptr;
    std::vector<op_t> gl(static_cast<size_t>(N));
    at::parallel_for(0, N, pass_grain(K), [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        op_t acc = has_bias ? static_cast<op_t>(Bp[n]) * colsum[n] : op_t(0);
        for (int64_t k = 0; k < K; ++k)
          acc += static_cast<op_t>(Gp[n * K + k]) * static_cast<op_t>(Wp[n * K + k]);
        gl[n] = acc;
      }
    });
    grad_l = vector_to_tensor(gl, opts);
  }
  if (need_gb) {
    // grad_bias = sum_rows(g * l) = l * sum_rows(g).
    for (int64_t n = 0; n < N; ++n) colsum[n] *= l[n];
    grad_b = vector_to_tensor(colsum, opts);
  }
  if (need_gw) {
    // grad_weight = (g * l)^T x = l[:, None] * G (G reused when grad_scale formed it).
    if (!G.defined()) G = at::mm(g.t(), x);
    scale_matrix<scalar_t, op_t>(G, l.data(), /*by_col=*/false, G);
    grad_w = G;
  }
  return {grad_x, grad_w, grad_b, grad_l};
}

}  // namespace

std::tuple<Tensor, Tensor> ia3_linear_cpu(const Tensor& x_in, const Tensor& weight_in,
                                          const std::optional<Tensor>& bias_in,
                                          const Tensor& scale_in, bool scale_input,
                                          bool keep_unscaled) {
  check_ia3_linear_args(x_in, weight_in, bias_in, scale_in, scale_input);
  // The ATen calls below are the kernel's own work: no autograd recording (the backward op is
  // called with grad mode on under create_graph, and out= calls refuse inputs needing grad).
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(x_in.device().is_cpu(), "fastpeft: ia3_linear_cpu needs CPU tensors, got x on ",
              x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor scale = scale_in.contiguous();
  std::optional<Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  std::tuple<Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "ia3_linear_cpu", [&] {
    out = forward_impl<scalar_t>(x, weight, bias, scale, scale_input, keep_unscaled);
  });
  return out;
}

Grads4 ia3_linear_backward_cpu(const Tensor& grad_out_in, const Tensor& x_in,
                               const Tensor& weight_in, const std::optional<Tensor>& bias_in,
                               const Tensor& scale_in, const Tensor& unscaled_in,
                               bool scale_input, std::array<bool, 4> output_mask) {
  const bool has_unscaled = ia3_has_unscaled(unscaled_in);
  check_ia3_linear_backward_args(grad_out_in, x_in, weight_in, scale_in, unscaled_in,
                                 scale_input, output_mask[1], output_mask[3]);
  // The ATen calls below are the kernel's own work: no autograd recording (the backward op is
  // called with grad mode on under create_graph, and out= calls refuse inputs needing grad).
  at::AutoDispatchBelowADInplaceOrView guard;
  TORCH_CHECK(grad_out_in.device().is_cpu(),
              "fastpeft: ia3_linear_backward_cpu needs CPU tensors, got grad_out on ",
              grad_out_in.device());
  check_optional_vector(grad_out_in, bias_in, weight_in.size(0), "bias", "out_features");
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor scale = scale_in.contiguous();
  const Tensor unscaled = has_unscaled ? unscaled_in.contiguous() : unscaled_in;
  std::optional<Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  Grads4 grads;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad_out.scalar_type(),
                                 "ia3_linear_backward_cpu", [&] {
    grads = backward_impl<scalar_t>(grad_out, x, weight, bias, scale, unscaled, scale_input,
                                    output_mask);
  });
  return grads;
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("ia3_linear", &fastpeft::ia3_linear_cpu);
  m.impl("ia3_linear_backward", &fastpeft::ia3_linear_backward_cpu);
}
