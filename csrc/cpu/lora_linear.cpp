// CPU lora_linear forward and backward (see docs/lora_linear_contract.md).
//
// The base GEMMs go to ATen (MKL / oneDNN, all threads) and accumulate (beta = 1) onto
// the LoRA terms written first: forward y = bias + scaling * t B^T per row block, then
// y += x W^T; backward grad_x = scaling * masked(g A) per row block, then += grad_out W.
// The row-block passes run in parallel: each thread regenerates the Philox dropout mask
// for its block in L1-sized runs (cpu/dropout.h, vectorised), applies it into a small
// scratch tile and multiplies that by the rank-r factors with the register-blocked
// kernels of cpu/rank_r.h (MKL runs these skinny k = r or n = r shapes at under half its
// big-GEMM rate). The backward computes g = grad_out (scaling B) and grad_out^T t in one
// read of grad_out. Neither the mask nor dropout(x) is ever stored. p == 0 skips the mask.
// The row blocks split evenly over the threads; the per-thread buffers persist across calls,
// and the factors' padded / transposed copies are made with plain loops (no ATen calls
// between the GEMMs: at M = 1024 these small ops and an uneven split cost ~3% of the step).
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "common/lora_checks.h"
#include "common/philox.h"
#include "cpu/dropout.h"
#include "cpu/rank_r.h"
#include "ops.h"

namespace fastpeft {
namespace {

using cpu::dropout_mask_run;
using cpu::kMaskRun;

// Rows per block: the block's rows of x (and of y / grad_out) stay in L2 while the
// rank-r products and the mask run over them.
int64_t target_block_rows(int64_t K, int64_t N) {
  const int64_t bm = 98304 / std::max<int64_t>(2 * K + N, 1);
  return std::clamp<int64_t>(bm, 8, 256);
}

// The row blocks of a pass: whole 4-row groups (the rank-r kernels' row tile), their
// count a multiple of the thread count so that every thread gets the same number of
// blocks of the same size (to within 4 rows): the pass ends when its slowest thread does.
struct RowBlocks {
  int64_t M = 0, count = 0;
  int64_t begin(int64_t b) const {
    const int64_t groups = (M + 3) / 4;
    return std::min(M, b * groups / count * 4);
  }
};

RowBlocks make_row_blocks(int64_t M, int64_t target_rows) {
  const int64_t nthreads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t groups = (M + 3) / 4;
  int64_t count = (M + target_rows - 1) / target_rows;
  count = (count + nthreads - 1) / nthreads * nthreads;
  return {M, std::clamp<int64_t>(count, 1, std::max<int64_t>(groups, 1))};
}

// Per-thread scratch buffers, kept across calls (no allocation, page faults or zeroing per
// call; each is at most a row block's worth). A slot's contents are only valid within one
// pass of the thread that owns it.
enum Scratch { kTile, kMask, kRankBuf, kRankBuf2, kWide, kWide2, kNumScratch };

template <typename T>
T* scratch(Scratch slot, int64_t n) {
  thread_local std::vector<T> bufs[kNumScratch];
  std::vector<T>& v = bufs[slot];
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

template <typename src_t, typename dst_t>
inline void convert(const src_t* src, dst_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<dst_t>(src[i]);
}

// A contiguous tensor's data in the accumulation type: the tensor itself when it already
// is, else converted into buf.
template <typename op_t, typename scalar_t>
const op_t* opmath_data(const Tensor& t, std::vector<op_t>& buf) {
  if constexpr (std::is_same_v<op_t, scalar_t>) {
    return t.data_ptr<scalar_t>();
  } else {
    buf.resize(static_cast<size_t>(t.numel()));
    convert(t.data_ptr<scalar_t>(), buf.data(), t.numel());
    return buf.data();
  }
}

// out [rows, rp] (zero-padded past r) = mul * m [rows, r], or mul * m^T when m is [r, rows].
template <typename op_t, typename scalar_t>
void padded_factor(const scalar_t* m, int64_t rows, int64_t r, bool transposed, op_t mul,
                   int64_t rp, op_t* out) {
  for (int64_t i = 0; i < rows; ++i) {
    if (!transposed)
      for (int64_t j = 0; j < r; ++j) out[i * rp + j] = mul * static_cast<op_t>(m[i * r + j]);
    for (int64_t j = r; j < rp; ++j) out[i * rp + j] = op_t(0);
  }
  if (!transposed) return;
  constexpr int64_t kTile = 16;  // 16 rows of m at a time (in L1), each output row written in order
  for (int64_t j0 = 0; j0 < r; j0 += kTile) {
    const int64_t j1 = std::min(r, j0 + kTile);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = j0; j < j1; ++j) out[i * rp + j] = mul * static_cast<op_t>(m[j * rows + i]);
  }
}

// Dropout mask of the flat elements [e0, e0 + count), applied as
//   tile[i] = x[i] * mask[i]  (when tile) and  gx[i] = h[i] * mask[i]  (when gx),
// in L1-sized runs so the mask never leaves the cache.
template <typename scalar_t, typename op_t>
void apply_dropout(int64_t e0, int64_t count, uint64_t seed, uint32_t threshold, op_t scale,
                   op_t* maskbuf, const scalar_t* x, op_t* tile, const op_t* h, scalar_t* gx) {
  for (int64_t c = 0; c < count; c += kMaskRun) {
    const int64_t len = std::min(kMaskRun, count - c);
    const op_t* mask = dropout_mask_run<op_t>(static_cast<uint64_t>(e0 + c), len, seed,
                                              threshold, scale, maskbuf);
    if (tile != nullptr) {
      op_t* tl = tile + c;
      const scalar_t* xl = x + c;
      for (int64_t i = 0; i < len; ++i) tl[i] = static_cast<op_t>(xl[i]) * mask[i];
    }
    if (gx != nullptr) {
      const op_t* hl = h + c;
      scalar_t* gl = gx + c;
      for (int64_t i = 0; i < len; ++i) gl[i] = static_cast<scalar_t>(hl[i] * mask[i]);
    }
  }
}

// The rank-r kernels' column count: r rounded up to whole 64-byte vectors.
template <typename op_t>
int64_t padded_rank(int64_t r) {
  constexpr int64_t kLanes = 64 / sizeof(op_t);
  return (r + kLanes - 1) / kLanes * kLanes;
}

// Forward LoRA side, one parallel pass over row blocks:
//   t[rows] = dropout(x[rows]) A^T;  y[rows] = bias + t[rows] (scaling B)^T.
// The caller then adds x W^T into y with one ATen GEMM (beta = 1).
template <typename scalar_t>
void forward_blocks(const Tensor& x, const Tensor& lora_a, const Tensor& lora_b,
                    const std::optional<Tensor>& bias, double scaling, double p, uint64_t seed,
                    Tensor& y, Tensor& t) {
  using op_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<op_t, scalar_t>;
  const int64_t M = x.size(0), K = x.size(1), r = lora_a.size(0), N = lora_b.size(0);
  const int64_t rp = padded_rank<op_t>(r);
  // The factors in op_t: A^T [K, rp] (zero-padded) and scaling * B^T [r, N].
  std::vector<op_t> at_pad(static_cast<size_t>(K * rp)), bst(static_cast<size_t>(r * N));
  padded_factor<op_t>(lora_a.data_ptr<scalar_t>(), K, r, /*transposed=*/true, op_t(1), rp,
                      at_pad.data());
  padded_factor<op_t>(lora_b.data_ptr<scalar_t>(), r, N, /*transposed=*/true,
                      static_cast<op_t>(scaling), N, bst.data());
  std::vector<op_t> bias_buf;
  const op_t* bias_p = bias.has_value() ? opmath_data<op_t, scalar_t>(*bias, bias_buf) : nullptr;
  const op_t* At = at_pad.data();
  const op_t* Bst = bst.data();
  const scalar_t* X = x.data_ptr<scalar_t>();
  scalar_t* T = t.data_ptr<scalar_t>();
  scalar_t* Y = y.data_ptr<scalar_t>();
  const bool dropout = p > 0.0;
  const uint32_t threshold = dropout_threshold(p);
  const op_t scale = static_cast<op_t>(1.0 / (1.0 - p));
  const RowBlocks blocks = make_row_blocks(M, target_block_rows(K, N));
  const int64_t bm = blocks.begin(1) + 4;  // an upper bound on any block's rows
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    const bool need_tile = dropout || !kDirect;
    op_t* tile = need_tile ? scratch<op_t>(kTile, bm * K) : nullptr;
    op_t* maskbuf = dropout ? scratch<op_t>(kMask, kMaskRun + 8) : nullptr;
    op_t* tbuf = scratch<op_t>(kRankBuf, bm * rp);
    op_t* ybuf = kDirect ? nullptr : scratch<op_t>(kWide, bm * N);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = blocks.begin(b), rows = blocks.begin(b + 1) - m0;
      if (rows == 0) continue;
      const int64_t e0 = m0 * K, count = rows * K;
      // src = dropout(x[rows]) (or x itself), in op_t.
      const op_t* src;
      if (dropout) {
        apply_dropout<scalar_t, op_t>(e0, count, seed, threshold, scale, maskbuf, X + e0, tile,
                                      nullptr, nullptr);
        src = tile;
      } else if constexpr (kDirect) {
        src = reinterpret_cast<const op_t*>(X + e0);
      } else {
        convert(X + e0, tile, count);
        src = tile;
      }
      // t[rows] = src A^T (shrink), kept padded in tbuf and copied out.
      cpu::rank_r_pass(rows, K, src, K, At, nullptr, tbuf, nullptr, rp);
      for (int64_t i = 0; i < rows; ++i) convert(tbuf + i * rp, T + (m0 + i) * r, r);
      // y[rows] = bias + t[rows] (scaling B)^T (expand).
      op_t* ydst = kDirect ? reinterpret_cast<op_t*>(Y + m0 * N) : ybuf;
      cpu::rank_r_expand(rows, N, r, tbuf, rp, Bst, bias_p, ydst, N);
      if constexpr (!kDirect) convert(ybuf, Y + m0 * N, rows * N);
    }
  });
}

// Backward LoRA side, one parallel pass over row blocks (each thread its own blocks):
//   g[rows]      = grad_out[rows] (scaling B)       } one pass over grad_out's rows
//   grad_lora_b += grad_out[rows]^T t[rows]         } (per-thread partials, scaled at the end)
//   grad_x[rows] = (g A) * mask                     (written; the caller then adds grad_out W)
//   grad_lora_a += g^T dropout(x[rows])             (per-thread partials, summed at the end)
template <typename scalar_t>
void backward_blocks(const Tensor& grad_out, const Tensor& x, const Tensor& lora_a,
                     const Tensor& lora_b, const Tensor& lora_t, double scaling, double p,
                     uint64_t seed, Tensor& grad_x, Tensor& grad_a, Tensor& grad_b) {
  using op_t = at::opmath_type<scalar_t>;
  constexpr bool kDirect = std::is_same_v<op_t, scalar_t>;
  const int64_t M = x.size(0), K = x.size(1), r = lora_a.size(0), N = grad_out.size(1);
  const bool need_gx = grad_x.defined(), need_ga = grad_a.defined(), need_gb = grad_b.defined();
  const bool need_g = need_gx || need_ga;
  const int64_t rp = padded_rank<op_t>(r);
  // The factors in op_t: scaling B [N, rp] (zero-padded) and A [r, K].
  std::vector<op_t> sb_pad(static_cast<size_t>(N * rp)), a_buf;
  padded_factor<op_t>(lora_b.data_ptr<scalar_t>(), N, r, /*transposed=*/false,
                      static_cast<op_t>(scaling), rp, sb_pad.data());
  const op_t* A = opmath_data<op_t, scalar_t>(lora_a, a_buf);
  const op_t* SB = sb_pad.data();
  const scalar_t* LT = lora_t.data_ptr<scalar_t>();
  const bool t_direct = kDirect && rp == r;  // t [M, r] is already in the kernels' layout
  const scalar_t* GO = grad_out.data_ptr<scalar_t>();
  const scalar_t* X = x.data_ptr<scalar_t>();
  scalar_t* GX = need_gx ? grad_x.data_ptr<scalar_t>() : nullptr;
  const bool dropout = p > 0.0;
  const uint32_t threshold = dropout_threshold(p);
  const op_t scale = static_cast<op_t>(1.0 / (1.0 - p));
  const RowBlocks blocks = make_row_blocks(M, target_block_rows(K, 0));
  const int64_t bm = blocks.begin(1) + 4;  // an upper bound on any block's rows
  // Per-thread partials of grad_lora_a^T [K, rp] and grad_lora_b / scaling [N, rp]; each
  // thread zeroes its own on first use (the unused ones stay uninitialised).
  const int64_t nthreads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t part_size = (need_ga ? K * rp : 0) + (need_gb ? N * rp : 0);
  const auto op_dtype = c10::CppTypeToScalarType<op_t>::value;
  const Tensor parts_t = at::empty({nthreads * part_size}, x.options().dtype(op_dtype));
  op_t* parts = parts_t.data_ptr<op_t>();
  std::vector<uint8_t> used(static_cast<size_t>(nthreads), 0);
  at::parallel_for(0, blocks.count, 1, [&](int64_t b0, int64_t b1) {
    const int64_t tid = std::min<int64_t>(at::get_thread_num(), nthreads - 1);
    op_t* part = parts + tid * part_size;
    if (!used[tid]) std::fill(part, part + part_size, op_t(0));
    used[tid] = 1;
    op_t* pa = need_ga ? part : nullptr;
    op_t* pb = need_gb ? part + (need_ga ? K * rp : 0) : nullptr;
    const bool need_tile = need_ga && (dropout || !kDirect);
    const bool need_h = need_gx && (dropout || !kDirect);
    op_t* g = need_g ? scratch<op_t>(kRankBuf, bm * rp) : nullptr;
    op_t* tpad = (need_gb && !t_direct) ? scratch<op_t>(kRankBuf2, bm * rp) : nullptr;
    op_t* gobuf = kDirect ? nullptr : scratch<op_t>(kWide, bm * N);
    op_t* tile = need_tile ? scratch<op_t>(kTile, bm * K) : nullptr;
    op_t* h = need_h ? scratch<op_t>(kWide2, bm * K) : nullptr;
    op_t* maskbuf = dropout ? scratch<op_t>(kMask, kMaskRun + 8) : nullptr;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = blocks.begin(b), rows = blocks.begin(b + 1) - m0;
      if (rows == 0) continue;
      const int64_t e0 = m0 * K, count = rows * K;
      // g and the grad_lora_b partial from one read of grad_out's rows.
      const op_t* go;
      if constexpr (kDirect) {
        go = reinterpret_cast<const op_t*>(GO + m0 * N);
      } else {
        convert(GO + m0 * N, gobuf, rows * N);
        go = gobuf;
      }
      const op_t* tp = nullptr;
      if (need_gb) {
        if (t_direct) {
          tp = reinterpret_cast<const op_t*>(LT) + m0 * rp;
        } else {
          padded_factor<op_t>(LT + m0 * r, rows, r, /*transposed=*/false, op_t(1), rp, tpad);
          tp = tpad;
        }
      }
      cpu::rank_r_pass(rows, N, go, N, SB, tp, g, pb, rp);
      if (!need_g) continue;
      // h = g A (expand), masked into grad_x below.
      if (need_gx) {
        op_t* hdst = need_h ? h : reinterpret_cast<op_t*>(GX + e0);
        cpu::rank_r_expand(rows, K, r, g, rp, A, nullptr, hdst, K);
      }
      const op_t* xsrc = nullptr;
      if (dropout) {
        apply_dropout<scalar_t, op_t>(e0, count, seed, threshold, scale, maskbuf, X + e0, tile, h,
                                      need_gx ? GX + e0 : nullptr);
        xsrc = tile;
      } else if constexpr (kDirect) {
        xsrc = reinterpret_cast<const op_t*>(X + e0);
      } else {
        if (need_gx) convert(h, GX + e0, count);
        if (need_ga) convert(X + e0, tile, count);
        xsrc = tile;
      }
      // grad_lora_a^T partial += dropout(x[rows])^T g.
      if (need_ga) cpu::rank_r_pass(rows, K, xsrc, K, nullptr, g, nullptr, pa, rp);
    }
  });
  // Sum the threads' partials into the first one's, then write grad_lora_a = (sum pa)^T
  // and grad_lora_b = scaling * sum pb.
  op_t* sum = nullptr;
  for (int64_t th = 0; th < nthreads; ++th) {
    if (!used[th]) continue;
    const op_t* part = parts + th * part_size;
    if (sum == nullptr) {
      sum = parts + th * part_size;
    } else {
      for (int64_t i = 0; i < part_size; ++i) sum[i] += part[i];
    }
  }
  if (need_ga) {
    scalar_t* out = grad_a.data_ptr<scalar_t>();
    for (int64_t j = 0; j < r; ++j)
      for (int64_t k = 0; k < K; ++k) out[j * K + k] = static_cast<scalar_t>(sum[k * rp + j]);
  }
  if (need_gb) {
    const op_t* pb = sum + (need_ga ? K * rp : 0);
    const op_t s = static_cast<op_t>(scaling);
    scalar_t* out = grad_b.data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < r; ++j) out[n * r + j] = static_cast<scalar_t>(s * pb[n * rp + j]);
  }
}

}  // namespace

std::tuple<Tensor, Tensor> lora_linear_cpu(const Tensor& x_in, const Tensor& weight_in,
                                           const std::optional<Tensor>& bias_in,
                                           const Tensor& lora_a_in, const Tensor& lora_b_in,
                                           double scaling, double dropout_p,
                                           const Tensor& seed) {
  check_lora_linear_args(x_in, weight_in, bias_in, lora_a_in, lora_b_in, dropout_p);
  TORCH_CHECK(x_in.device().is_cpu(), "fastpeft: lora_linear_cpu needs CPU tensors, got x on ",
              x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor lora_a = lora_a_in.contiguous();
  const Tensor lora_b = lora_b_in.contiguous();
  std::optional<Tensor> bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t M = x.size(0), N = weight.size(0), r = lora_a.size(0);
  const uint64_t s = dropout_p > 0.0 ? read_seed(seed) : 0;

  if (M == 0 || r == 0) {
    Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    return {y, at::zeros({M, r}, x.options())};
  }
  // y = bias + scaling * t B^T, written block by block with t; then y += x W^T.
  Tensor y = at::empty({M, N}, x.options());
  Tensor t = at::empty({M, r}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lora_linear_cpu", [&] {
    forward_blocks<scalar_t>(x, lora_a, lora_b, bias, scaling, dropout_p, s, y, t);
  });
  y.addmm_(x, weight.t());
  return {y, t};
}

Grads5 lora_linear_backward_cpu(const Tensor& grad_out_in, const Tensor& x_in,
                                const Tensor& weight_in, const Tensor& lora_a_in,
                                const Tensor& lora_b_in, const Tensor& lora_t_in, double scaling,
                                double dropout_p, const Tensor& seed,
                                std::array<bool, 5> output_mask) {
  check_lora_linear_args(x_in, weight_in, std::nullopt, lora_a_in, lora_b_in, dropout_p);
  TORCH_CHECK(x_in.device().is_cpu(),
              "fastpeft: lora_linear_backward_cpu needs CPU tensors, got x on ", x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0);
  const int64_t r = lora_a_in.size(0);
  check_backward_args(x_in, grad_out_in, lora_t_in, N, r);
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor lora_a = lora_a_in.contiguous();
  const Tensor lora_b = lora_b_in.contiguous();
  const Tensor lora_t = lora_t_in.contiguous();
  const bool need_gx = output_mask[0], need_gw = output_mask[1], need_gbias = output_mask[2];
  const bool need_ga = output_mask[3], need_gb = output_mask[4];
  const uint64_t s = dropout_p > 0.0 && (need_gx || need_ga) ? read_seed(seed) : 0;

  // A masked-off output is its own empty tensor: outputs of an op must not alias.
  Tensor grad_x = x.new_empty({0}), grad_w = x.new_empty({0}), grad_bias = x.new_empty({0});
  Tensor grad_a = x.new_empty({0}), grad_b = x.new_empty({0});
  if (need_gw) grad_w = at::mm(grad_out.t(), x);
  if (need_gbias) grad_bias = grad_out.sum(0);
  if (M == 0 || r == 0) {
    if (need_gx) grad_x = at::mm(grad_out, weight);
    if (need_ga) grad_a = at::zeros({r, K}, x.options());
    if (need_gb) grad_b = at::zeros({N, r}, x.options());
    return {grad_x, grad_w, grad_bias, grad_a, grad_b};
  }
  if (need_gx || need_ga || need_gb) {
    Tensor gx_arg, ga_arg, gb_arg;
    if (need_gx) gx_arg = grad_x = at::empty({M, K}, x.options());
    if (need_ga) ga_arg = grad_a = at::empty({r, K}, x.options());
    if (need_gb) gb_arg = grad_b = at::empty({N, r}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lora_linear_backward_cpu", [&] {
      backward_blocks<scalar_t>(grad_out, x, lora_a, lora_b, lora_t, scaling, dropout_p, s,
                                gx_arg, ga_arg, gb_arg);
    });
  }
  // grad_x = grad_out W + (the masked LoRA term already written).
  if (need_gx) grad_x.addmm_(grad_out, weight);
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear", &fastpeft::lora_linear_cpu);
  m.impl("lora_linear_backward", &fastpeft::lora_linear_backward_cpu);
}
