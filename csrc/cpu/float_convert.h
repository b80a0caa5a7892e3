// Storage types of the CPU kernels and their conversion to the compute type.
//
// fp16 and bf16 are held as raw 16-bit patterns so the CPU sources need neither
// torch nor compiler extensions. Rounding is to nearest, ties to even, exactly as
// torch rounds float -> half / bfloat16.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace livethinking::cpu::detail {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

inline float to_float(BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

inline BFloat16 bfloat16_from_float(float f) {
  uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return BFloat16{0x7fc0};  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);                              // round half to even
  return BFloat16{static_cast<uint16_t>(bits >> 16)};
}

inline float to_float(Half v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exponent = (v.bits >> 10) & 0x1fu;
  const uint32_t mantissa = v.bits & 0x3ffu;
  if (exponent == 0x1fu) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf/NaN
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline Half half_from_float(float f) {
  const uint32_t bits = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return Half{static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
  if (magnitude >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};  // -> inf
  if (magnitude < 0x38800000u) {  // below the smallest normal half: round to a subnormal
    // value / 2^-24, exact in float, rounded to the nearest integer (ties to even).
    const float scaled = bits_to_float(magnitude) * 16777216.0f;
    return Half{static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)))};
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  uint32_t result = magnitude - (112u << 23);
  result += 0xfffu + ((result >> 13) & 1u);
  return Half{static_cast<uint16_t>(sign | (result >> 13))};
}

inline float to_float(float v) { return v; }
inline double to_float(double v) { return v; }

// Compute (accumulation) type of each storage type.
template <typename T> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

template <typename T> inline T from_compute(typename Compute<T>::type v);
template <> inline float from_compute<float>(float v) { return v; }
template <> inline double from_compute<double>(double v) { return v; }
template <> inline Half from_compute<Half>(float v) { return half_from_float(v); }
template <> inline BFloat16 from_compute<BFloat16>(float v) { return bfloat16_from_float(v); }

template <typename T> inline typename Compute<T>::type load(const T& v) {
  return static_cast<typename Compute<T>::type>(to_float(v));
}

}  // namespace livethinking::cpu::detail
