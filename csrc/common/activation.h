// The adapter activations and their derivatives, for CPU and CUDA code alike (compute them in
// float or double: T is the op-math type). Same formulas as torch.nn.functional.
#pragma once

#include <cmath>

#include "common/adapter_bottleneck_checks.h"

#if defined(__CUDACC__)
#define FASTPEFT_HD __host__ __device__ __forceinline__
#else
#define FASTPEFT_HD inline
#endif

namespace fastpeft {

template <typename T>
FASTPEFT_HD T activation_forward(Activation act, T z) {
  constexpr T kInvSqrt2 = T(0.70710678118654752440);
  constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  switch (act) {
    case Activation::kRelu:
      return z > T(0) ? z : T(0);
    case Activation::kGelu:
      return T(0.5) * z * (T(1) + erf(z * kInvSqrt2));
    case Activation::kGeluTanh: {
      const T inner = kSqrt2OverPi * (z + T(0.044715) * z * z * z);
      return T(0.5) * z * (T(1) + tanh(inner));
    }
    case Activation::kSilu:
    default:
      return z / (T(1) + exp(-z));
  }
}

// d act / d z at z (relu: 0 at z <= 0, as torch).
template <typename T>
FASTPEFT_HD T activation_backward(Activation act, T z) {
  constexpr T kInvSqrt2 = T(0.70710678118654752440);
  constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
  constexpr T kSqrt2OverPi = T(0.79788456080286535588);
  switch (act) {
    case Activation::kRelu:
      return z > T(0) ? T(1) : T(0);
    case Activation::kGelu:
      return T(0.5) * (T(1) + erf(z * kInvSqrt2)) + z * kInvSqrt2Pi * exp(T(-0.5) * z * z);
    case Activation::kGeluTanh: {
      const T z2 = z * z;
      const T th = tanh(kSqrt2OverPi * (z + T(0.044715) * z2 * z));
      return T(0.5) * (T(1) + th) +
             T(0.5) * z * (T(1) - th * th) * kSqrt2OverPi * (T(1) + T(3) * T(0.044715) * z2);
    }
    case Activation::kSilu:
    default: {
      const T s = T(1) / (T(1) + exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
  }
}

}  // namespace fastpeft
