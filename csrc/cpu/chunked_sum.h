// Deterministic parallel sums on the CPU: [0, n) split into fixed chunks (independent of the
// thread count), each chunk's K partial sums in double, added in chunk order. The chunks are
// large (64K elements): below that, waking the thread pool costs more than the work (and on a
// loaded machine a whole scheduler tick, ~8 ms measured here for a 0.1 ms job).
#pragma once

#include <array>
#include <vector>

#include <ATen/Parallel.h>

namespace fastpeft {

constexpr int64_t kSumChunk = 65536;

// f(begin, end, acc) adds its elements' K values to acc (zero-initialised).
template <int K, typename F>
std::array<double, K> chunked_sum(int64_t n, const F& f) {
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<std::array<double, K>> parts(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::array<double, K> acc{};
      f(c * kSumChunk, std::min(n, (c + 1) * kSumChunk), acc);
      parts[static_cast<size_t>(c)] = acc;
    }
  });
  std::array<double, K> total{};
  for (const auto& p : parts)
    for (int k = 0; k < K; ++k) total[k] += p[k];
  return total;
}

// The number of true entries of a bool mask.
inline int64_t count_true(const bool* m, int64_t n) {
  const auto s = chunked_sum<1>(n, [&](int64_t b, int64_t e, std::array<double, 1>& acc) {
    int64_t c = 0;
    for (int64_t i = b; i < e; ++i) c += m[i];
    acc[0] += static_cast<double>(c);
  });
  return static_cast<int64_t>(s[0]);
}

}  // namespace fastpeft
