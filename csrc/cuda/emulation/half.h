// fp16 and bf16 for the CPU execution target: storage types with the names of cuda_fp16.h /
// cuda_bf16.h and bit-exact conversions (round to nearest, ties to even, as the __*_rn
// intrinsics; subnormals and overflow to infinity included). Unit-tested against torch's own
// conversions by python_tests/test_cuda_emulation.py. No arithmetic operators on purpose: the
// kernels compute in float, and a kernel that did arithmetic on halves should not compile here.
#pragma once

#include <cstdint>
#include <cstring>

#include "cuda/emulation/vector_types.h"

struct __half {
  unsigned short __x;
};
struct __nv_bfloat16 {
  unsigned short __x;
};
struct alignas(4) __half2 {
  __half x, y;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace selattn::emu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline unsigned short float_to_half_bits(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, absx = x & 0x7fffffffu;
  if (absx > 0x7f800000u) return static_cast<unsigned short>(0x7fffu);  // canonical NaN, as CUDA
  if (absx >= 0x38800000u) {  // half normal range (or above: the carry below reaches infinity)
    if (absx >= 0x47800000u) return static_cast<unsigned short>(sign | 0x7c00u);  // >= 2^16
    uint32_t h = (absx >> 13) - (uint32_t(127 - 15) << 10);
    const uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<unsigned short>(sign | h);
  }
  // Half subnormal: m * 2^-24 with m = (1.mant) * 2^(E - 126), rounded to nearest even.
  const uint32_t e = absx >> 23;
  if (e < 102) return static_cast<unsigned short>(sign);  // below 2^-25: rounds to zero
  const uint32_t full = (absx & 0x7fffffu) | 0x800000u, shift = 126 - e;
  uint32_t m = full >> shift;
  const uint32_t rem = full & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (m & 1u))) ++m;
  return static_cast<unsigned short>(sign | m);
}

inline float half_bits_to_float(unsigned short h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {
    const float mag = float(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -mag : mag;
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline unsigned short float_to_bf16_bits(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<unsigned short>(0x7fffu);
  return static_cast<unsigned short>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_bits_to_float(unsigned short b) { return bits_float(uint32_t(b) << 16); }

}  // namespace selattn::emu

inline __half __float2half(float f) { return {selattn::emu::float_to_half_bits(f)}; }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline float __half2float(__half h) { return selattn::emu::half_bits_to_float(h.__x); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half(lo), __float2half(hi)}; }
inline float2 __half22float2(__half2 v) { return {__half2float(v.x), __half2float(v.y)}; }

inline __nv_bfloat16 __float2bfloat16(float f) { return {selattn::emu::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return selattn::emu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16(lo), __float2bfloat16(hi)};
}
inline float2 __bfloat1622float2(__nv_bfloat162 v) {
  return {__bfloat162float(v.x), __bfloat162float(v.y)};
}
