// SIMD vectors for the ISA level this translation unit is built for (SMCA_ISA_LEVEL: 2 AVX-512,
// 1 AVX2 + FMA, 0 the architecture's baseline), with what the kernels need: arithmetic, fused
// multiply-add, compare-and-select masks, horizontal reductions and exp2. Written out per ISA with
// intrinsics instead of left to the auto-vectoriser: GCC vectorised the exp loops of the earlier
// kernels for AVX-512 only ("control flow in loop" at AVX2 and SSE2), which left AVX2 machines
// computing exp one element at a time.
//
// Vec holds float32; Scalar<T> has the same interface one element wide, for float64 (the
// checking dtype, exact libm exp2) and for architectures with no vector unit we know.
// Part of cpu/kernels.h: included after the target pragma, outside headers already included.
#pragma once

namespace smca::cpu::SMCA_ISA {

// 2^x in arithmetic on V (as Cephes exp2f: x = n + r, |r| <= 1/2, 2^r = 1 + r P(r) with P of
// degree 5); relative error within 1e-7 where the result is a normal float. Exactly 0 for
// x <= -127 (n = -127: a zero exponent field), -inf included, and NaN for NaN: V::max and V::min
// return their second argument when either is NaN, so the clamps keep it. The kernels call it
// with x = score - row max <= 0 (in base 2); above 127 it saturates instead of returning inf.
template <class V>
V exp2_poly(V x) {
  const V xc = V::min(V::broadcast(127.0f), V::max(V::broadcast(-127.0f), x));
  // Adding 1.5 * 2^23 + 127 rounds to an integer n and leaves n + 127 in the low mantissa bits:
  // shifted into the exponent field, they are 2^n.
  const V magic = V::broadcast(12583039.0f);
  const V t = xc + magic;
  const V r = xc - (t - magic);
  V p = V::broadcast(1.535336188319500e-4f);
  p = V::fma(p, r, V::broadcast(1.339887440266574e-3f));
  p = V::fma(p, r, V::broadcast(9.618437357674640e-3f));
  p = V::fma(p, r, V::broadcast(5.550332471162809e-2f));
  p = V::fma(p, r, V::broadcast(2.402264791363012e-1f));
  p = V::fma(p, r, V::broadcast(6.931472028550421e-1f));
  return V::fma(p, r, V::broadcast(1.0f)) * V::exponent_bits_to_float(t);
}

// One element of T, with the interface of Vec.
template <typename T>
struct Scalar {
  static constexpr int kWidth = 1;
  using Mask = bool;
  T v;
  static Scalar zero() { return {T(0)}; }
  static Scalar broadcast(T x) { return {x}; }
  static Scalar load(const T* p) { return {*p}; }
  void store(T* p) const { *p = v; }
  Scalar operator+(Scalar b) const { return {v + b.v}; }
  Scalar operator-(Scalar b) const { return {v - b.v}; }
  Scalar operator*(Scalar b) const { return {v * b.v}; }
  static Scalar fma(Scalar a, Scalar b, Scalar c) { return {a.v * b.v + c.v}; }
  static Scalar fnma(Scalar a, Scalar b, Scalar c) { return {c.v - a.v * b.v}; }
  // b when either is NaN, as x86's maxps and minps.
  static Scalar max(Scalar a, Scalar b) { return {a.v > b.v ? a.v : b.v}; }
  static Scalar min(Scalar a, Scalar b) { return {a.v < b.v ? a.v : b.v}; }
  static Mask eq(Scalar a, Scalar b) { return a.v == b.v; }
  static Mask both(Mask a, Mask b) { return a && b; }
  static Mask first(int64_t n) { return n > 0; }
  static Scalar select(Mask m, Scalar a, Scalar b) { return m ? a : b; }
  static T reduce_add(Scalar a) { return a.v; }
  static T reduce_max(Scalar a) { return a.v; }
  // The float whose bits are those of t shifted left by 23 (float only; see exp2_poly).
  static Scalar exponent_bits_to_float(Scalar t) {
    uint32_t bits;
    std::memcpy(&bits, &t.v, sizeof(bits));
    bits <<= 23;
    float result;
    std::memcpy(&result, &bits, sizeof(result));
    return {result};
  }
  static Scalar exp2(Scalar x) {
    if constexpr (std::is_same_v<T, double>) {
      return {std::exp2(x.v)};
    } else {
      return exp2_poly(x);
    }
  }
};

#if SMCA_ISA_LEVEL == 2
struct Vec {
  static constexpr int kWidth = 16;
  using Mask = __mmask16;
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  Vec operator+(Vec b) const { return {_mm512_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm512_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm512_mul_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm512_min_ps(a.v, b.v)}; }
  static Mask eq(Vec a, Vec b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
  static Mask both(Mask a, Mask b) { return a & b; }
  static Mask first(int64_t n) {  // lanes [0, n)
    return n >= kWidth ? Mask(0xFFFF) : Mask((1u << (n > 0 ? n : 0)) - 1u);
  }
  static Vec select(Mask m, Vec a, Vec b) { return {_mm512_mask_blend_ps(m, b.v, a.v)}; }
  static float reduce_add(Vec a) { return _mm512_reduce_add_ps(a.v); }
  static float reduce_max(Vec a) { return _mm512_reduce_max_ps(a.v); }
  static Vec fnma(Vec a, Vec b, Vec c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
  static Vec exponent_bits_to_float(Vec t) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t.v), 23))};
  }
  static Vec exp2(Vec x) { return exp2_poly(x); }
};
// 32 registers: 12 x 2 accumulators, 2 for B, 1 broadcast.
constexpr int kGemmRows = 12, kGemmVecs = 2;

#elif SMCA_ISA_LEVEL == 1
struct Vec {
  static constexpr int kWidth = 8;
  using Mask = __m256;  // all-ones lanes
  __m256 v;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  Vec operator+(Vec b) const { return {_mm256_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm256_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm256_mul_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm256_min_ps(a.v, b.v)}; }
  static Mask eq(Vec a, Vec b) { return _mm256_cmp_ps(a.v, b.v, _CMP_EQ_OQ); }
  static Mask both(Mask a, Mask b) { return _mm256_and_ps(a, b); }
  static Mask first(int64_t n) {
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(n < kWidth ? n : kWidth)),
                         _CMP_LT_OQ);
  }
  static Vec select(Mask m, Vec a, Vec b) { return {_mm256_blendv_ps(b.v, a.v, m)}; }
  static float reduce_add(Vec a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
  static float reduce_max(Vec a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
  static Vec fnma(Vec a, Vec b, Vec c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
  static Vec exponent_bits_to_float(Vec t) {
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t.v), 23))};
  }
  static Vec exp2(Vec x) { return exp2_poly(x); }
};
// 16 registers: 6 x 2 accumulators, 2 for B, 1 broadcast.
constexpr int kGemmRows = 6, kGemmVecs = 2;

#elif defined(__ARM_NEON)
struct Vec {
  static constexpr int kWidth = 4;
  using Mask = uint32x4_t;
  float32x4_t v;
  static Vec zero() { return {vdupq_n_f32(0.0f)}; }
  static Vec broadcast(float x) { return {vdupq_n_f32(x)}; }
  static Vec load(const float* p) { return {vld1q_f32(p)}; }
  void store(float* p) const { vst1q_f32(p, v); }
  Vec operator+(Vec b) const { return {vaddq_f32(v, b.v)}; }
  Vec operator-(Vec b) const { return {vsubq_f32(v, b.v)}; }
  Vec operator*(Vec b) const { return {vmulq_f32(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
  static Vec max(Vec a, Vec b) { return {vmaxq_f32(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {vminq_f32(a.v, b.v)}; }
  static Mask eq(Vec a, Vec b) { return vceqq_f32(a.v, b.v); }
  static Mask both(Mask a, Mask b) { return vandq_u32(a, b); }
  static Mask first(int64_t n) {
    const uint32_t lanes[4] = {0, 1, 2, 3};
    const int64_t count = n < 4 ? (n > 0 ? n : 0) : 4;
    return vcltq_u32(vld1q_u32(lanes), vdupq_n_u32(static_cast<uint32_t>(count)));
  }
  static Vec select(Mask m, Vec a, Vec b) { return {vbslq_f32(m, a.v, b.v)}; }
  static float reduce_add(Vec a) { return vaddvq_f32(a.v); }
  static float reduce_max(Vec a) { return vmaxvq_f32(a.v); }
  static Vec fnma(Vec a, Vec b, Vec c) { return {vfmsq_f32(c.v, a.v, b.v)}; }
  static Vec exponent_bits_to_float(Vec t) {
    return {vreinterpretq_f32_u32(vshlq_n_u32(vreinterpretq_u32_f32(t.v), 23))};
  }
  static Vec exp2(Vec x) { return exp2_poly(x); }
};
// 32 registers: 8 x 2 accumulators.
constexpr int kGemmRows = 8, kGemmVecs = 2;

#elif defined(__SSE2__)
// x86-64 baseline: no fused multiply-add, no blend.
struct Vec {
  static constexpr int kWidth = 4;
  using Mask = __m128;
  __m128 v;
  static Vec zero() { return {_mm_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm_loadu_ps(p)}; }
  void store(float* p) const { _mm_storeu_ps(p, v); }
  Vec operator+(Vec b) const { return {_mm_add_ps(v, b.v)}; }
  Vec operator-(Vec b) const { return {_mm_sub_ps(v, b.v)}; }
  Vec operator*(Vec b) const { return {_mm_mul_ps(v, b.v)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm_add_ps(_mm_mul_ps(a.v, b.v), c.v)}; }
  static Vec max(Vec a, Vec b) { return {_mm_max_ps(a.v, b.v)}; }
  static Vec min(Vec a, Vec b) { return {_mm_min_ps(a.v, b.v)}; }
  static Mask eq(Vec a, Vec b) { return _mm_cmpeq_ps(a.v, b.v); }
  static Mask both(Mask a, Mask b) { return _mm_and_ps(a, b); }
  static Mask first(int64_t n) {
    return _mm_cmplt_ps(_mm_setr_ps(0, 1, 2, 3),
                        _mm_set1_ps(static_cast<float>(n < kWidth ? n : kWidth)));
  }
  static Vec select(Mask m, Vec a, Vec b) {
    return {_mm_or_ps(_mm_and_ps(m, a.v), _mm_andnot_ps(m, b.v))};
  }
  static float reduce_add(Vec a) {
    const __m128 s = _mm_add_ps(a.v, _mm_movehl_ps(a.v, a.v));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static float reduce_max(Vec a) {
    const __m128 m = _mm_max_ps(a.v, _mm_movehl_ps(a.v, a.v));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
  static Vec fnma(Vec a, Vec b, Vec c) { return {_mm_sub_ps(c.v, _mm_mul_ps(a.v, b.v))}; }
  static Vec exponent_bits_to_float(Vec t) {
    return {_mm_castsi128_ps(_mm_slli_epi32(_mm_castps_si128(t.v), 23))};
  }
  static Vec exp2(Vec x) { return exp2_poly(x); }
};
// 16 registers: 4 x 2 accumulators, and temporaries for the separate multiply and add.
constexpr int kGemmRows = 4, kGemmVecs = 2;

#else
using Vec = Scalar<float>;
constexpr int kGemmRows = 4, kGemmVecs = 4;
#endif

// The vector type the element-wise passes use for T.
template <typename T>
using VecOf = std::conditional_t<std::is_same_v<T, float>, Vec, Scalar<T>>;

}  // namespace smca::cpu::SMCA_ISA
