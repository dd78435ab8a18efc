// CPU lora_linear_multi forward and backward (see docs/lora_linear_contract.md).
//
// SGMV-style: the rows are grouped by adapter id with a counting sort, each group's rows
// are gathered once, the rank-r GEMMs run per group, and the results are scattered back
// (added into y / grad_x). Rows with id -1 only get the base layer.
#include <vector>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/lora_checks.h"
#include "ops.h"

namespace fastpeft {
namespace {

// Rows of each adapter: order holds the row indices sorted by adapter id (stable), and
// adapter j's rows are order[offsets[j] : offsets[j + 1]]. Rows with id -1 are left out.
struct RowGroups {
  Tensor order;                  // int64 [number of rows with id >= 0]
  std::vector<int64_t> offsets;  // n + 1
};

RowGroups group_rows(const Tensor& adapter_ids, int64_t n) {
  const Tensor ids = adapter_ids.contiguous();
  const int64_t M = ids.size(0);
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<int64_t> counts(static_cast<size_t>(n) + 1, 0);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t v = id[m];
    TORCH_CHECK(v >= -1 && v < n, "fastpeft: adapter_ids must be in [-1, ", n, ") (-1 = base only, ",
                n, " adapters), got ", v, " at row ", m);
    if (v >= 0) ++counts[static_cast<size_t>(v) + 1];
  }
  for (int64_t j = 0; j < n; ++j) counts[j + 1] += counts[j];
  RowGroups groups;
  groups.offsets = counts;
  groups.order = at::empty({counts[n]}, ids.options());
  int64_t* order = groups.order.data_ptr<int64_t>();
  std::vector<int64_t> next(counts.begin(), counts.end() - 1);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t v = id[m];
    if (v >= 0) order[next[v]++] = m;
  }
  return groups;
}

void check_multi_cpu(const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "fastpeft: lora_linear_multi_cpu needs CPU tensors, got x on ",
              x.device());
}

}  // namespace

std::tuple<Tensor, Tensor> lora_linear_multi_cpu(const Tensor& x_in, const Tensor& weight_in,
                                                 const std::optional<Tensor>& bias_in,
                                                 const Tensor& lora_a_in, const Tensor& lora_b_in,
                                                 const Tensor& scalings_in,
                                                 const Tensor& adapter_ids) {
  check_lora_linear_multi_args(x_in, weight_in, bias_in, lora_a_in, lora_b_in, scalings_in,
                               adapter_ids);
  check_multi_cpu(x_in);
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor lora_a = lora_a_in.contiguous();
  const Tensor lora_b = lora_b_in.contiguous();
  const Tensor scalings = scalings_in.contiguous();
  const int64_t M = x.size(0), n = lora_a.size(0), r = lora_a.size(1);
  const RowGroups groups = group_rows(adapter_ids, n);
  const float* sc = scalings.data_ptr<float>();

  Tensor y = bias_in.has_value() ? at::addmm(bias_in->contiguous(), x, weight.t())
                                 : at::mm(x, weight.t());
  Tensor t = at::zeros({M, r}, x.options());
  if (M == 0 || r == 0) return {y, t};
  for (int64_t j = 0; j < n; ++j) {
    const int64_t lo = groups.offsets[j], hi = groups.offsets[j + 1];
    if (hi == lo) continue;
    const bool all_rows = (hi - lo) == M;  // one adapter for the whole batch: no gather
    const Tensor rows = groups.order.narrow(0, lo, hi - lo);
    const Tensor xg = all_rows ? x : x.index_select(0, rows);
    const Tensor tg = at::mm(xg, lora_a[j].t());
    if (all_rows) {
      t.copy_(tg);
      y.addmm_(tg, lora_b[j].t(), 1.0, sc[j]);
    } else {
      t.index_copy_(0, rows, tg);
      Tensor yg = at::mm(tg, lora_b[j].t());
      y.index_add_(0, rows, yg, sc[j]);
    }
  }
  return {y, t};
}

Grads5 lora_linear_multi_backward_cpu(const Tensor& grad_out_in, const Tensor& x_in,
                                      const Tensor& weight_in, const Tensor& lora_a_in,
                                      const Tensor& lora_b_in, const Tensor& scalings_in,
                                      const Tensor& adapter_ids, const Tensor& lora_t_in,
                                      std::array<bool, 5> output_mask) {
  check_lora_linear_multi_args(x_in, weight_in, std::nullopt, lora_a_in, lora_b_in, scalings_in,
                               adapter_ids);
  check_multi_cpu(x_in);
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0);
  const int64_t n = lora_a_in.size(0), r = lora_a_in.size(1);
  check_backward_args(x_in, grad_out_in, lora_t_in, N, r);
  const Tensor grad_out = grad_out_in.contiguous();
  const Tensor x = x_in.contiguous();
  const Tensor weight = weight_in.contiguous();
  const Tensor lora_a = lora_a_in.contiguous();
  const Tensor lora_b = lora_b_in.contiguous();
  const Tensor lora_t = lora_t_in.contiguous();
  const Tensor scalings = scalings_in.contiguous();
  const bool need_gx = output_mask[0], need_gw = output_mask[1], need_gbias = output_mask[2];
  const bool need_ga = output_mask[3], need_gb = output_mask[4];
  const RowGroups groups = group_rows(adapter_ids, n);
  const float* sc = scalings.data_ptr<float>();

  // A masked-off output is its own empty tensor: outputs of an op must not alias.
  Tensor grad_x = x.new_empty({0}), grad_w = x.new_empty({0}), grad_bias = x.new_empty({0});
  Tensor grad_a = x.new_empty({0}), grad_b = x.new_empty({0});
  if (need_gw) grad_w = at::mm(grad_out.t(), x);
  if (need_gbias) grad_bias = grad_out.sum(0);
  if (need_gx) grad_x = at::mm(grad_out, weight);
  if (need_ga) grad_a = at::zeros({n, r, K}, x.options());
  if (need_gb) grad_b = at::zeros({n, N, r}, x.options());
  if (M == 0 || r == 0 || !(need_gx || need_ga || need_gb))
    return {grad_x, grad_w, grad_bias, grad_a, grad_b};

  for (int64_t j = 0; j < n; ++j) {
    const int64_t lo = groups.offsets[j], hi = groups.offsets[j + 1];
    if (hi == lo) continue;
    const double s = sc[j];
    const bool all_rows = (hi - lo) == M;
    const Tensor rows = groups.order.narrow(0, lo, hi - lo);
    const Tensor gog = all_rows ? grad_out : grad_out.index_select(0, rows);
    if (need_gb) {
      const Tensor tg = all_rows ? lora_t : lora_t.index_select(0, rows);
      Tensor gbj = grad_b[j];
      at::mm_out(gbj, gog.t(), tg);
      gbj.mul_(s);
    }
    if (!need_gx && !need_ga) continue;
    // gs = s_j * grad_out[rows] B_j
    Tensor gs = at::mm(gog, lora_b[j]);
    gs.mul_(s);
    if (need_ga) {
      const Tensor xg = all_rows ? x : x.index_select(0, rows);
      Tensor gaj = grad_a[j];
      at::mm_out(gaj, gs.t(), xg);
    }
    if (need_gx) {
      if (all_rows) {
        grad_x.addmm_(gs, lora_a[j]);
      } else {
        grad_x.index_add_(0, rows, at::mm(gs, lora_a[j]));
      }
    }
  }
  return {grad_x, grad_w, grad_bias, grad_a, grad_b};
}

}  // namespace fastpeft

TORCH_LIBRARY_IMPL(fastpeft, CPU, m) {
  m.impl("lora_linear_multi", &fastpeft::lora_linear_multi_cpu);
  m.impl("lora_linear_multi_backward", &fastpeft::lora_linear_multi_backward_cpu);
}
