// Counter-based Philox4x32-10 generator and a deterministic Box-Muller transform.
//
// Written once for host and device: the same source compiles in the CPU kernels (g++) and in the
// CUDA kernels (nvcc), and must produce the same bits on both. To make that hold:
//   * only integer ops, IEEE +, -, *, /, sqrt and fused multiply-add are used (all correctly
//     rounded on both sides; the fused one only where written as fma_rn);
//   * on the device every float op goes through the _rn intrinsics, which nvcc never fuses into
//     an FMA; on the host the files that include this header are compiled with -ffp-contract=off;
//   * log, sin and cos are our own polynomials below, not libm / CUDA math (which differ).
//
// Element i of a stream is defined by (seed, stream, i) alone, so any thread decomposition
// (1 or 2 OpenMP threads, any CUDA grid) yields the same tensor.
#pragma once
#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define SE_HD __host__ __device__ __forceinline__
#define SE_UNROLL _Pragma("unroll")
#else
#define SE_HD inline
#define SE_UNROLL
#endif

namespace subspace_ext {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kW1 = 0xBB67AE85u;  // sqrt(3) - 1

struct U32x4 {
  uint32_t v[4];
};

SE_HD void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  // The 64-bit product below becomes a mul.lo.s64 whose SASS adds a zero high part to every
  // result (one extra instruction per multiply); the 32-bit pair compiles to one IMAD.WIDE.U32.
  hi = __umulhi(a, b);
  lo = a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds (Salmon et al., SC'11; the Random123 reference).
SE_HD U32x4 philox4x32_10(U32x4 ctr, uint32_t k0, uint32_t k1) {
SE_UNROLL
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, ctr.v[0], hi0, lo0);
    mulhilo(kM1, ctr.v[2], hi1, lo1);
    U32x4 next;
    next.v[0] = hi1 ^ ctr.v[1] ^ k0;
    next.v[1] = lo1;
    next.v[2] = hi0 ^ ctr.v[3] ^ k1;
    next.v[3] = lo0;
    ctr = next;
  }
  return ctr;
}

// The block of 4 words that holds element `block` of (seed, stream).
SE_HD U32x4 block_bits(uint64_t seed, uint64_t stream, uint64_t block) {
  U32x4 ctr;
  ctr.v[0] = static_cast<uint32_t>(block);
  ctr.v[1] = static_cast<uint32_t>(block >> 32);
  ctr.v[2] = static_cast<uint32_t>(stream);
  ctr.v[3] = static_cast<uint32_t>(stream >> 32);
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// ---- exactly rounded arithmetic, never contracted ------------------------------------------
#if defined(__CUDA_ARCH__)
SE_HD float add(float a, float b) { return __fadd_rn(a, b); }
SE_HD float sub(float a, float b) { return __fsub_rn(a, b); }
SE_HD float mul(float a, float b) { return __fmul_rn(a, b); }
SE_HD float div(float a, float b) { return __fdiv_rn(a, b); }
SE_HD float sqrt_rn(float a) { return __fsqrt_rn(a); }
SE_HD double add(double a, double b) { return __dadd_rn(a, b); }
SE_HD double sub(double a, double b) { return __dsub_rn(a, b); }
SE_HD double mul(double a, double b) { return __dmul_rn(a, b); }
SE_HD double div(double a, double b) { return __ddiv_rn(a, b); }
SE_HD double sqrt_rn(double a) { return __dsqrt_rn(a); }
SE_HD float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
#else
template <typename T> SE_HD T add(T a, T b) { return a + b; }
template <typename T> SE_HD T sub(T a, T b) { return a - b; }
template <typename T> SE_HD T mul(T a, T b) { return a * b; }
template <typename T> SE_HD T div(T a, T b) { return a / b; }
template <typename T> SE_HD T sqrt_rn(T a) { return std::sqrt(a); }
// a * b + c rounded once: an FMA instruction where the target has one (x86 FMA/AVX-512 clones,
// AArch64), else libm's fmaf, which is exactly rounded too.
SE_HD float fma_rn(float a, float b, float c) { return std::fma(a, b, c); }
#endif

// Split x > 0 (normal) into m in [sqrt(1/2), sqrt(2)) and e with x = m * 2^e, by bit manipulation.
SE_HD float split_exp(float x, int& e) {
  uint32_t b;
  memcpy(&b, &x, sizeof b);
  e = static_cast<int>((b >> 23) & 0xFFu) - 127;
  b = (b & 0x007FFFFFu) | 0x3F800000u;  // mantissa in [1, 2)
  float m;
  memcpy(&m, &b, sizeof m);
  const bool high = m > 1.41421356f;  // selects, not branches: the CPU loops vectorise
  e += high ? 1 : 0;
  return high ? mul(m, 0.5f) : m;
}
SE_HD double split_exp(double x, int& e) {
  uint64_t b;
  memcpy(&b, &x, sizeof b);
  e = static_cast<int>((b >> 52) & 0x7FFu) - 1023;
  b = (b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
  double m;
  memcpy(&m, &b, sizeof m);
  const bool high = m > 1.4142135623730951;
  e += high ? 1 : 0;
  return high ? mul(m, 0.5) : m;
}

// Number of series terms: enough for full precision of each type on the reduced ranges below.
template <typename T> struct Terms;
template <> struct Terms<float> { static constexpr int kLog = 7, kTrig = 6; };
template <> struct Terms<double> { static constexpr int kLog = 13, kTrig = 10; };

SE_HD constexpr double signed_inv_factorial(int n, int k) {
  double f = 1.0;
  for (int j = 2; j <= n; ++j) f *= j;
  return (k & 1 ? -1.0 : 1.0) / f;
}

// Horner evaluation with coefficients folded at compile time:
//   Atanh<T,K,N>: sum_{k>=K}^{N-1} x^{2(k-K)} / (2k+1)
//   Sin<T,K,N>:   sum_{k>=K}^{N}   (-1)^k x^{2(k-K)} / (2k+1)!     (times x outside)
//   Cos<T,K,N>:   sum_{k>=K}^{N}   (-1)^k x^{2(k-K)} / (2k)!
template <typename T, int K, int N> struct Atanh {
  static_assert(K < N, "Atanh needs at least one term");
  static SE_HD T eval(T s2) {
    constexpr double c = 1.0 / (2 * K + 1);
    // The last term is its constant: 0 * s2 + c would be c exactly (s2 is finite), but IEEE rules
    // keep a compiler from folding that multiply-add, which cost two operations per logarithm.
    if constexpr (K + 1 == N)
      return static_cast<T>(c);
    else
      return add(mul(Atanh<T, K + 1, N>::eval(s2), s2), static_cast<T>(c));
  }
};
template <typename T, int K, int N> struct Sin {
  static SE_HD T eval(T x2) {
    constexpr double c = signed_inv_factorial(2 * K + 1, K);
    return add(mul(Sin<T, K + 1, N>::eval(x2), x2), static_cast<T>(c));
  }
};
template <typename T, int N> struct Sin<T, N, N> {
  static SE_HD T eval(T) { return static_cast<T>(signed_inv_factorial(2 * N + 1, N)); }
};
template <typename T, int K, int N> struct Cos {
  static SE_HD T eval(T x2) {
    constexpr double c = signed_inv_factorial(2 * K, K);
    return add(mul(Cos<T, K + 1, N>::eval(x2), x2), static_cast<T>(c));
  }
};
template <typename T, int N> struct Cos<T, N, N> {
  static SE_HD T eval(T) { return static_cast<T>(signed_inv_factorial(2 * N, N)); }
};

// log(x) for x in (0, 1]: x = m 2^e, log m = 2 atanh(s), s = (m-1)/(m+1), |s| <= 0.1716.
template <typename T> SE_HD T det_log(T x) {
  int e;
  const T m = split_exp(x, e);
  const T s = div(sub(m, T(1)), add(m, T(1)));  // m - 1 is exact (Sterbenz)
  const T log_m = mul(mul(T(2), s), Atanh<T, 0, Terms<T>::kLog>::eval(mul(s, s)));
  return add(mul(static_cast<T>(e), static_cast<T>(0.69314718055994530942)), log_m);
}

// sin and cos of x in [0, pi/4].
template <typename T> SE_HD void sincos_small(T x, T& s, T& c) {
  const T x2 = mul(x, x);
  s = mul(Sin<T, 0, Terms<T>::kTrig>::eval(x2), x);
  c = Cos<T, 0, Terms<T>::kTrig>::eval(x2);
}

// (cos 2 pi u, sin 2 pi u) for u in [0, 1): quadrant by exact scaling, then a [0, pi/4] kernel.
template <typename T> SE_HD void sincos_2pi(T u, T& c, T& s) {
  const T t = mul(u, T(4));  // exact
  const int q = static_cast<int>(t);
  T f = sub(t, static_cast<T>(q));  // exact, in [0, 1)
  const bool swap = f > T(0.5);
  f = swap ? sub(T(1), f) : f;  // exact
  T sx, cx;
  sincos_small(mul(f, static_cast<T>(1.57079632679489661923)), sx, cx);
  const T cp = swap ? sx : cx;  // cos of the angle within the quadrant
  const T sp = swap ? cx : sx;
  // quadrant q: (c, s) = (cp, sp), (-sp, cp), (-cp, -sp), (sp, -cp); as selects (exact negations)
  const int qq = q & 3;
  const T a = (qq & 1) ? sp : cp;
  const T b = (qq & 1) ? cp : sp;
  c = (qq == 1 || qq == 2) ? -a : a;
  s = (qq >= 2) ? -b : b;
}

template <typename T> SE_HD void box_muller(T u1, T u2, T& z0, T& z1) {
  const T r = sqrt_rn(mul(T(-2), det_log(u1)));
  T c, s;
  sincos_2pi(u2, c, s);
  z0 = mul(r, c);
  z1 = mul(r, s);
}

// Standard normal numbers of Philox block `block` of (seed, stream):
//  float32: 4 normals per block (24-bit uniforms; u1 in (0, 1], u2 in [0, 1)), elements 4b..4b+3;
//  float64: 2 normals per block (53-bit uniforms from two words each), elements 2b, 2b+1.
template <typename T> struct PerBlock;
template <> struct PerBlock<float> { static constexpr int value = 4; };
template <> struct PerBlock<double> { static constexpr int value = 2; };

SE_HD void normals_of_block(uint64_t seed, uint64_t stream, uint64_t block, float out[4]) {
  const U32x4 x = block_bits(seed, stream, block);
SE_UNROLL
  for (int pair = 0; pair < 2; ++pair) {
    const uint32_t a = x.v[2 * pair], b = x.v[2 * pair + 1];
    const float u1 = static_cast<float>((a >> 8) + 1u) * 5.9604644775390625e-8f;  // 2^-24
    const float u2 = static_cast<float>(b >> 8) * 5.9604644775390625e-8f;
    box_muller(u1, u2, out[2 * pair], out[2 * pair + 1]);
  }
}

SE_HD void normals_of_block(uint64_t seed, uint64_t stream, uint64_t block, double out[2]) {
  const U32x4 x = block_bits(seed, stream, block);
  const uint64_t a = (static_cast<uint64_t>(x.v[0]) << 21) | (x.v[1] >> 11);
  const uint64_t b = (static_cast<uint64_t>(x.v[2]) << 21) | (x.v[3] >> 11);
  const double u1 = static_cast<double>(a + 1u) * 1.1102230246251565404e-16;  // 2^-53
  const double u2 = static_cast<double>(b) * 1.1102230246251565404e-16;
  box_muller(u1, u2, out[0], out[1]);
}

// ---- the "icdf" transform (float32 only): one normal per Philox word, by the inverse normal CDF
// of the word's cell, piecewise polynomial (tools/fit_normal_icdf.py defines the table and
// documents the steps; worst error 1.31 ulp of the exact quantile). About half of
// box_muller's instructions per number on sm_90, and no division or square root; the numbers differ from
// box_muller's, so it is its own method of philox_normal, not a drop-in.
// `tab` is normal_icdf_table.h's coefficients: the host's array or a device (shared) copy.
// clz of a = 2r + 1 (r < 2^31), i.e. 30 - floor(log2 r), and 31 for r = 0. On the host from the
// exponent of an exactly converted float (r's low 7 bits cleared where r has more than 24), which
// the CPU loops vectorise; bit scans do not.
SE_HD uint32_t clz_odd(uint32_t a) {
#if defined(__CUDA_ARCH__)
  // The shift that brings the top set bit to bit 31: one FLO.SH (__clz is FLO and a subtraction,
  // to give 32 for a zero, which a = 2r + 1 never is).
  uint32_t e;
  asm("bfind.shiftamt.u32 %0, %1;" : "=r"(e) : "r"(a));
  return e;
#else
  const uint32_t r = a >> 1;
  const float f = static_cast<float>(static_cast<int32_t>(r >= 128u ? (r & ~127u) : r));
  uint32_t fb;
  memcpy(&fb, &f, sizeof fb);
  return r == 0 ? 31u : 157u - (fb >> 23);  // exponent field = 127 + floor(log2 r)
#endif
}

// The integer steps: the word's segment (0..127) and v in [0, 1), its distance to the segment's end.
SE_HD void icdf_reduce(uint32_t w, uint32_t& seg, float& v) {
  const uint32_t a = (w << 1) | 1u;  // p = a / 2^33
  const uint32_t e = clz_odd(a);
  const uint32_t n = a << e;  // bit 31 set: n >> 29 is 4 + the next two bits
  seg = 4u * e + (n >> 29) - 4u;
  // 0x3F800000 | (~n >> 6 & 0x7FFFFF): the 23 bits after those two, complemented, as the mantissa
  // of a float in [1, 2); the exponent bits go in with the complement's xor mask.
#if defined(__CUDA_ARCH__)
  uint32_t vb;  // one LOP3 (the compiler makes two of and-then-xor with two constants)
  asm("lop3.b32 %0, %1, 0x7FFFFF, %2, 0x6A;" : "=r"(vb) : "r"(n >> 6), "r"(0x3FFFFFFFu));
#else
  const uint32_t vb = ((n >> 6) & 0x7FFFFFu) ^ 0x3FFFFFFFu;
#endif
  memcpy(&v, &vb, sizeof v);
  v = sub(v, 1.0f);  // exact
}

// |z| = c0 + v (c1 + v (c2 + v (c3 + v (c4 + v c5)))), each step one fused multiply-add
// (c: the segment's row).
template <typename Coef> SE_HD float icdf_poly(float v, Coef c) {
  float z = c(5);
SE_UNROLL
  for (int k = 4; k >= 0; --k) z = fma_rn(z, v, c(k));
  return z;
}

SE_HD float icdf_sign(float mag, uint32_t w) {  // w's top bit is the sign
  uint32_t zb;
  memcpy(&zb, &mag, sizeof zb);
  zb |= w & 0x80000000u;
  memcpy(&mag, &zb, sizeof mag);
  return mag;
}

SE_HD float icdf_normal(uint32_t w, const float* tab) {
  uint32_t seg;
  float v;
  icdf_reduce(w, seg, v);
  const float* row = tab + 8 * seg;
  return icdf_sign(icdf_poly(v, [row](int k) { return row[k]; }), w);
}

// Standard normal number for element `i` of (seed, stream) (computes its whole block).
template <typename T> SE_HD T normal_at(uint64_t seed, uint64_t stream, uint64_t i) {
  constexpr int per = PerBlock<T>::value;
  T z[per];
  normals_of_block(seed, stream, i / per, z);
  return z[i % per];
}

// Visit elements [i0, i1) of (seed, stream) as f(i, z), one Philox block at a time.
template <typename T, typename F>
SE_HD void for_each_normal(uint64_t seed, uint64_t stream, int64_t i0, int64_t i1, F&& f) {
  constexpr int per = PerBlock<T>::value;
  T z[per];
  for (int64_t b = i0 / per; b * per < i1; ++b) {
    normals_of_block(seed, stream, static_cast<uint64_t>(b), z);
    const int64_t lo = b * per > i0 ? b * per : i0;
    const int64_t hi = (b + 1) * per < i1 ? (b + 1) * per : i1;
    for (int64_t i = lo; i < hi; ++i) f(i, z[i - b * per]);
  }
}

}  // namespace philox
}  // namespace subspace_ext
