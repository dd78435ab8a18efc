// 64-byte GCC vectors for the CPU row passes (a zmm register in the x86-64-v4 clone, two ymm
// in the AVX2 one), with an exp accurate to ~1 ulp and horizontal sum / max. The functions are
// always_inline, so they take the ISA of the FASTPEFT_CPU_CLONES function that calls them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__ELF__)
#define FASTPEFT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FASTPEFT_CPU_CLONES
#endif

namespace fastpeft::vec64 {

template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename Vec64<T>::type;

template <typename T>
__attribute__((always_inline)) inline Vec<T> load64(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
__attribute__((always_inline)) inline void store64(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// exp on one vector. fp32: Cephes' expf (range reduction by ln 2, degree-6 polynomial, ~1 ulp)
// for x <= 88, flushed to 0 below -87 (and for -inf). fp64 (the testing dtype): std::exp.
__attribute__((always_inline)) inline Vec<float> vexp(Vec<float> x) {
  using VI = Vec<int32_t>;
  const Vec<float> lo = Vec<float>{} - 87.0f;
  const Vec<float> xc = x < lo ? lo : x;
  const Vec<float> t = xc * 1.44269504088896341f + 12582912.0f;  // 1.5 * 2^23: round to int
  const Vec<float> nf = t - 12582912.0f;
  const Vec<float> r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  const Vec<float> r2 = r * r;
  Vec<float> p = Vec<float>{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const VI n = __builtin_bit_cast(VI, t) - 0x4B400000;  // t's low mantissa bits: round(x/ln2)
  const VI bits = (n + 127) << 23;                            // 2^n
  const Vec<float> res = p * __builtin_bit_cast(Vec<float>, bits);
  return x < lo ? Vec<float>{} : res;
}
__attribute__((always_inline)) inline Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < 8; ++i) x[i] = std::exp(x[i]);
  return x;
}

template <typename T>
__attribute__((always_inline)) inline T hsum(Vec<T> v) {
  T r = 0;
  for (int i = 0; i < static_cast<int>(64 / sizeof(T)); ++i) r += v[i];
  return r;
}
template <typename T>
__attribute__((always_inline)) inline T hmax(Vec<T> v) {
  T r = v[0];
  for (int i = 1; i < static_cast<int>(64 / sizeof(T)); ++i) r = std::max(r, v[i]);
  return r;
}

}  // namespace fastpeft::vec64
