// CPU kernels for pruned weights in llmprune's row bitmask layout (cpu_kernels.py packs it):
//   masks   uint8 [rows, kb]: bit j of byte c flags input 8c + j of the row as kept; kb is a multiple of 8,
//           so a row's inputs are padded with zeros to kp = 8 kb (a multiple of 64);
//   values  fp32, bf16 or fp16 [kept + 16]: the kept values row after row (16 trailing zeros, so a vector
//           load at the end of the last row stays inside the buffer);
//   offsets int64 [rows + 1]: where each row's values start.
// y = x Wᵀ with fp32 sums, three ways:
//   expand: each group of W inputs is expanded from its kept values in registers (AVX-512: vexpandps; AVX2:
//           a permutation looked up by the mask byte, then the unkept lanes zeroed), then multiplied by up
//           to 8 tokens; for 1-8 tokens, where a CPU waits on memory and every byte not read is time saved;
//   gather: each kept value is broadcast and multiplied by its input's row of x transposed (the tokens side
//           by side): only kept values cost arithmetic, for more tokens, where the arithmetic shows;
//   dense:  the rows expanded to a dense block, for torch's GEMM (prefill).
// One body (bitmask_cpu_body.h) is compiled three times under different target pragmas (AVX-512F, AVX2 + FMA
// + F16C, and the baseline ISA), and the caller picks by what the CPU reports at run time: the build does
// not assume the machine it runs on. Where the CPU also has AVX-512 BF16 and VBMI2, bf16 values at 1-8 tokens
// take a fourth kernel of bf16 dot products (namespace avx512bf16). Work is split over output rows on torch's thread pool (at::parallel_for).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"
#include <c10/util/Half.h>
#if defined(__x86_64__) || defined(__i386__)
#define LLMPRUNE_X86 1
#include <immintrin.h>
#endif

#include <array>
#include <cstdint>
#include <cstring>
#include <string>

// The mask is read as 64-bit words whose bit k is input k (expand_rows_t, gather_rows_t): little-endian only.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the CPU kernels read masks as little-endian words");

namespace llmprune_cpu {
// Software prefetch into L2 of the values and masks a fixed distance ahead of where a row's loop reads, once per
// 64 inputs: two lines of fp32 values (128 bytes, the values of 64 inputs at 50%), one of 16-bit values. The
// hardware prefetchers stop at 4 KiB pages and, with one token, left the loop waiting on memory: on an Intel Xeon
// (AVX-512, 2 cores, 2026-12-03) this ran one token on 4096x4096 1.1x (50%) and 1.4x (70%) faster with fp32 values
// and 1.7x / 2.2x with bf16 ones; 4-8 KiB distances measured alike, 2 KiB less, and a prefetch per cache line
// (a loop with a data-dependent count) was slower than the fixed count here.
constexpr int64_t kValuesAhead = 4096, kMasksAhead = 512;
template <class V> inline void prefetch_ahead(const V* values, const uint8_t* masks) {
  const char* at = reinterpret_cast<const char*>(values) + kValuesAhead;
  __builtin_prefetch(at, 0, 2);
  if (sizeof(V) == 4) __builtin_prefetch(at + 64, 0, 2);
  __builtin_prefetch(masks + kMasksAhead, 0, 2);
}

struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

inline float to_float(float v) { return v; }
inline float to_float(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(f16 v) { return c10::detail::fp16_ieee_to_fp32_value(v.bits); }

// kPermute[m][lane]: for a kept lane of mask byte m, how many kept lanes precede it (where its value sits
// among the loaded ones); -1 (sign bit set) for an unkept lane, whose register lane is then zeroed. One byte a
// lane: an entry is 8 bytes, so the whole table (2 KiB) stays in L1 beside x, and an entry's address is m·8, a
// scaled index the load takes as it is.
constexpr std::array<std::array<int8_t, 8>, 256> permute_table() {
  std::array<std::array<int8_t, 8>, 256> t{};
  for (int m = 0; m < 256; ++m) {
    int c = 0;
    for (int lane = 0; lane < 8; ++lane) t[m][lane] = (m >> lane) & 1 ? int8_t(c++) : int8_t(-1);
  }
  return t;
}
alignas(64) constexpr std::array<std::array<int8_t, 8>, 256> kPermute = permute_table();

inline int popcount(unsigned m) { return __builtin_popcount(m); }

// ---- the baseline ISA (whatever the compiler targets by default; vectorised by the compiler where it can) ----
namespace portable {
struct Ops {
  static constexpr int W = 8;
  struct F { float v[8]; };
  static F zero() { return F{}; }
  static F load(const float* p) { F r; for (int i = 0; i < 8; ++i) r.v[i] = p[i]; return r; }
  static void store(float* p, F a) { for (int i = 0; i < 8; ++i) p[i] = a.v[i]; }
  static F fma(F a, F b, F c) { for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
  static F add(F a, F b) { for (int i = 0; i < 8; ++i) a.v[i] += b.v[i]; return a; }
  static float hsum(F a) { float s = 0; for (int i = 0; i < 8; ++i) s += a.v[i]; return s; }
  template <class V> static F expand(unsigned m, const V* p) {
    F r;
    const auto& idx = kPermute[m];
    for (int i = 0; i < 8; ++i) {  // branch-free: an unkept lane reads the first value and clears its bits
      const int32_t j = idx[i];
      const float v = to_float(p[j & ~(j >> 31)]);
      uint32_t u;
      std::memcpy(&u, &v, 4);
      u &= ~uint32_t(j >> 31);
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
  template <class V> static F broadcast(const V* p) { F r; float v = to_float(*p); for (int i = 0; i < 8; ++i) r.v[i] = v; return r; }
  template <class V> static F loadw(const V* p) { F r; for (int i = 0; i < 8; ++i) r.v[i] = to_float(p[i]); return r; }
};
#include "bitmask_cpu_body.h"
}  // namespace portable

#ifdef LLMPRUNE_X86
// ---- AVX2 + FMA + F16C ----
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,popcnt,bmi,bmi2")
namespace avx2 {
struct Ops {
  static constexpr int W = 8;
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static F load8(const float* p) { return _mm256_loadu_ps(p); }
  static F load8(const bf16* p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static F load8(const f16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  template <class V> static F expand(unsigned m, const V* p) {
    // the entry's bytes sign-extended to lanes: vpermps reads an index's low 3 bits, and an unkept lane's −1
    // carries the sign bit that picks zero in the blend (one instruction, where a shift and an and-not were two)
    const __m256i idx = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kPermute[m].data())));
    const F w = _mm256_permutevar8x32_ps(load8(p), idx);
    return _mm256_blendv_ps(w, _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
  }
  static F broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  template <class V> static F broadcast(const V* p) { return _mm256_set1_ps(to_float(*p)); }
  template <class V> static F loadw(const V* p) { return load8(p); }
};
#include "bitmask_cpu_body.h"
}  // namespace avx2
#pragma GCC pop_options

// ---- AVX-512F ----
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c,popcnt,bmi,bmi2")
namespace avx512 {
struct Ops {
  static constexpr int W = 16;
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static F load16(const float* p) { return _mm512_loadu_ps(p); }
  static F load16(const bf16* p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static F load16(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  // bf16/fp16 values: a 32-byte load widened, then vexpandps in registers. fp32 values: each half by AVX2's table
  // permutation from a 32-byte load, then joined; measured faster on AMD Zen 5 than vexpandps from memory or a
  // 64-byte load (which crosses a cache line on nearly every group) expanded in registers.
  template <class V> static F expand(unsigned m, const V* p) { return _mm512_maskz_expand_ps(__mmask16(m), load16(p)); }
  static F expand(unsigned m, const float* p) {
    const unsigned lo = m & 0xFF;
    const __m256 a = avx2::Ops::expand(lo, p), b = avx2::Ops::expand(m >> 8, p + popcount(lo));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
  }
  static F broadcast(const float* p) { return _mm512_set1_ps(*p); }
  template <class V> static F broadcast(const V* p) { return _mm512_set1_ps(to_float(*p)); }
  template <class V> static F loadw(const V* p) { return load16(p); }
};
#include "bitmask_cpu_body.h"
}  // namespace avx512

// The same AVX-512 kernels with fp32 values expanded by vexpandps straight from memory: on an Intel Xeon with
// AVX-512 (2 cores, 2026-12-03) 1.2-1.9x faster at one token than the two table permutations above, which measured
// faster on AMD Zen 5. Which one runs is set once per process (set_fp32_expand_load; cpu_kernels.py picks by the
// CPU's vendor).
namespace avx512_load {
struct Ops : avx512::Ops {
  template <class V> static F expand(unsigned m, const V* p) { return avx512::Ops::expand(m, p); }
  static F expand(unsigned m, const float* p) { return _mm512_maskz_expandloadu_ps(__mmask16(m), p); }
};
#include "bitmask_cpu_body.h"
}  // namespace avx512_load
#pragma GCC pop_options

// ---- AVX-512 with BF16 dot products and VBMI2 word expansion: bf16 values, 1-8 tokens ----
// 32 bf16 values are expanded by their mask straight from memory (vpexpandw) and multiplied by 32 inputs in one
// vdpbf16ps (pairs of bf16 products summed into 16 fp32 lanes), where the AVX-512F path widens, shifts and expands
// 16 at a time and then multiplies. x is split into bf16 parts, x = x1 (+ x2 (+ x3)), as few as hold it exactly (1
// for inputs that come from bf16, 2 from fp16, 3 from fp32): a bf16 times a bf16 is exact in fp32, so every product
// is that of the fp32 path and only the order of the fp32 sums differs. Three parts (fp32 activations) take this path
// at one token only, and only where the caller allows them (set_bf16_max_parts: measured faster on AMD Zen 4, slower
// on an Intel Xeon; at 2-4 tokens 0.5-0.8× the AVX-512F code on the Zen 4, where the bytes saved no longer pay); x
// that no three parts hold exactly (subnormal inputs, which the conversion flushes; inf, NaN), fp32 and fp16 values,
// more tokens and expansion run the AVX-512F code.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi2,avx2,fma,f16c,popcnt,bmi,bmi2")
namespace avx512bf16 {
constexpr int kMaxParts = 3;

// xs [kMaxParts][tokens][kp] bf16 bits: part q of token t at xs + (q·tokens + t)·kp; returns the parts x needs
// (kMaxParts + 1 where even kMaxParts leave a residual).
int split(const float* x, int64_t ldx, int64_t tokens, int64_t kp, uint16_t* xs) {
  __m512i spill[kMaxParts];  // |residual| bits after each part
  for (int q = 0; q < kMaxParts; ++q) spill[q] = _mm512_setzero_si512();
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t k = 0; k < kp; k += 16) {
      __m512 r = _mm512_loadu_ps(x + t * ldx + k);
      for (int q = 0; q < kMaxParts; ++q) {
        const __m256i part = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(r));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xs + (q * tokens + t) * kp + k), part);
        r = _mm512_sub_ps(r, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(part), 16)));
        spill[q] = _mm512_or_si512(spill[q], _mm512_castps_si512(_mm512_abs_ps(r)));
      }
    }
  }
  for (int q = 0; q < kMaxParts; ++q)
    if (_mm512_cmpneq_epi32_mask(spill[q], _mm512_setzero_si512()) == _mm512_int2mask(0)) return q + 1;
  return kMaxParts + 1;
}

// T tokens against rows r0..r1, x in P parts. S chains of accumulators (each part and half of a 64-input word its
// own for 1-2 tokens), so that the dot products do not wait on each other's latency.
template <int T, int P>
void dot_rows_t(const uint16_t* xs, int64_t tokens, int64_t t0, int64_t kp, const bf16* values, const uint8_t* masks,
                int64_t kb, const int64_t* offsets, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int S = T <= 2 ? 2 * P : 2;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = masks + n * kb;
    const uint16_t* p = reinterpret_cast<const uint16_t*>(values + offsets[n]);
    __m512 acc[S][T];
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < T; ++t) acc[s][t] = _mm512_setzero_ps();
    for (int64_t j = 0; j < kb / 8; ++j) {
      uint64_t word;
      std::memcpy(&word, row + 8 * j, 8);
      prefetch_ahead(p, row + 8 * j);
      const uint32_t lo = uint32_t(word);
      const __m512bh w[2] = {reinterpret_cast<__m512bh>(_mm512_maskz_expandloadu_epi16(__mmask32(lo), p)),
                             reinterpret_cast<__m512bh>(_mm512_maskz_expandloadu_epi16(__mmask32(word >> 32), p + popcount(lo)))};
#pragma GCC unroll 2
      for (int q = 0; q < P; ++q)
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
          const uint16_t* xq = xs + (q * tokens + t0 + t) * kp + j * 64;
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {
            const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xq + 32 * h));
            acc[(2 * q + h) % S][t] = _mm512_dpbf16_ps(acc[(2 * q + h) % S][t], w[h], xv);
          }
        }
      p += __builtin_popcountll(word);
    }
    for (int t = 0; t < T; ++t) {
      __m512 sum = acc[0][t];
      for (int s = 1; s < S; ++s) sum = _mm512_add_ps(sum, acc[s][t]);
      y[t * ldy + n] = _mm512_reduce_add_ps(sum);
    }
  }
}

template <int P>
void dot_rows_p(int T, const uint16_t* xs, int64_t tokens, int64_t t0, int64_t kp, const bf16* values,
                const uint8_t* masks, int64_t kb, const int64_t* offsets, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  switch (T) {
    case 1: dot_rows_t<1, P>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 2: dot_rows_t<2, P>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 3: dot_rows_t<3, P>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 4: dot_rows_t<4, P>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 5: dot_rows_t<5, P>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 6: dot_rows_t<6, P>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 7: dot_rows_t<7, P>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1); break;
    default: dot_rows_t<8, P>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1); break;
  }
}

void dot_rows(int parts, int T, const uint16_t* xs, int64_t tokens, int64_t t0, int64_t kp, const bf16* values,
              const uint8_t* masks, int64_t kb, const int64_t* offsets, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  if (parts == 1) dot_rows_p<1>(T, xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1);
  else if (parts == 2) dot_rows_p<2>(T, xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1);
  else dot_rows_t<1, 3>(xs, tokens, t0, kp, values, masks, kb, offsets, y, ldy, r0, r1);  // one token only
}
// Rows r0..r1 of the dense 16-bit weight [rows, kp] (bf16 or fp16 bits): one vpexpandw per 32 inputs.
void dense_rows16(const uint16_t* values, const uint8_t* masks, int64_t kb, const int64_t* offsets, uint16_t* out,
                  int64_t r0, int64_t r1) {
  const int64_t kp = 8 * kb;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = masks + n * kb;
    const uint16_t* p = values + offsets[n];
    uint16_t* o = out + n * kp;
    for (int64_t j = 0; j < kb / 8; ++j, o += 64) {
      uint64_t word;
      std::memcpy(&word, row + 8 * j, 8);
      const uint32_t lo = uint32_t(word);
      _mm512_storeu_si512(o, _mm512_maskz_expandloadu_epi16(__mmask32(lo), p));
      _mm512_storeu_si512(o + 32, _mm512_maskz_expandloadu_epi16(__mmask32(word >> 32), p + popcount(lo)));
      p += __builtin_popcountll(word);
    }
  }
}
}  // namespace avx512bf16
#pragma GCC pop_options
// The same for every other CPU: each kept value stored at its set bit's place in a zeroed row.
void dense_rows16(const uint16_t* values, const uint8_t* masks, int64_t kb, const int64_t* offsets, uint16_t* out,
                  int64_t r0, int64_t r1) {
  const int64_t kp = 8 * kb;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = masks + n * kb;
    const uint16_t* p = values + offsets[n];
    uint16_t* o = out + n * kp;
    std::memset(o, 0, 2 * kp);
    for (int64_t j = 0; j < kb / 8; ++j) {
      uint64_t word;
      std::memcpy(&word, row + 8 * j, 8);
      for (; word; word &= word - 1) o[64 * j + __builtin_ctzll(word)] = *p++;
    }
  }
}

bool g_fp32_expand_load = false;
int g_bf16_max_parts = 2;  // the most bf16 parts of x the AVX512_BF16 dot products take (2 or 3)
// The instruction set asked for (the caller checked the CPU has it) runs `call` from its namespace.
#define LLMPRUNE_DISPATCH(isa, call)                        \
  do {                                                      \
    if ((isa) >= AVX512 && g_fp32_expand_load) avx512_load::call; \
    else if ((isa) >= AVX512) avx512::call;                 \
    else if ((isa) == AVX2) avx2::call;                     \
    else portable::call;                                    \
  } while (0)
#else
#define LLMPRUNE_DISPATCH(isa, call) portable::call
#endif

enum Isa : int64_t { PORTABLE = 0, AVX2 = 1, AVX512 = 2, AVX512_BF16 = 3 };

void set_fp32_expand_load(bool on) {
#ifdef LLMPRUNE_X86
  g_fp32_expand_load = on;
#else
  (void)on;
#endif
}
bool fp32_expand_load() {
#ifdef LLMPRUNE_X86
  return g_fp32_expand_load;
#else
  return false;
#endif
}

void set_bf16_max_parts(int64_t parts) {
  TORCH_CHECK(parts == 2 || parts == 3, "bf16 parts: 2 or 3");
#ifdef LLMPRUNE_X86
  g_bf16_max_parts = int(parts);
#endif
}
int64_t bf16_max_parts() {
#ifdef LLMPRUNE_X86
  return g_bf16_max_parts;
#else
  return 2;
#endif
}

// "intel", "amd" or "other": the vendor the CPU reports.
std::string cpu_vendor() {
#ifdef LLMPRUNE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) return "intel";
  if (__builtin_cpu_is("amd")) return "amd";
#endif
  return "other";
}

int64_t best_isa() {
#ifndef LLMPRUNE_X86
  return PORTABLE;
#else
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16") &&
      __builtin_cpu_supports("avx512vbmi2"))
    return AVX512_BF16;
  if (__builtin_cpu_supports("avx512f")) return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) return AVX2;
  return PORTABLE;
#endif
}

void check(const torch::Tensor& values, const torch::Tensor& masks, const torch::Tensor& offsets, int64_t isa) {
  TORCH_CHECK(values.is_contiguous() && masks.is_contiguous() && offsets.is_contiguous(), "layout tensors must be contiguous");
  TORCH_CHECK(masks.scalar_type() == torch::kUInt8 && masks.dim() == 2 && masks.size(1) % 8 == 0, "masks: uint8 [rows, 8k]");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.numel() == masks.size(0) + 1, "offsets: int64 [rows + 1]");
  TORCH_CHECK(values.device().is_cpu() && masks.device().is_cpu() && offsets.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(isa >= PORTABLE && isa <= best_isa(), "this CPU lacks the instruction set asked for");
}

// Calls f(tag) with a null pointer of the values' element type.
template <class Fn> void by_dtype(const torch::Tensor& values, Fn&& f) {
  switch (values.scalar_type()) {
    case torch::kFloat: f(static_cast<const float*>(nullptr)); break;
    case torch::kBFloat16: f(static_cast<const bf16*>(nullptr)); break;
    case torch::kHalf: f(static_cast<const f16*>(nullptr)); break;
    default: TORCH_CHECK(false, "values must be float32, bfloat16 or float16");
  }
}

// Rows per task: enough work per task to amortise the pool (about 32k weights), at least 4 rows.
int64_t grain(int64_t kp) { return std::max<int64_t>(4, (1 << 15) / std::max<int64_t>(kp, 1)); }

// y [tokens, rows] = x [tokens, kp] Wᵀ, expanding in registers (x fp32, zero-padded to kp inputs; its row stride
// may exceed kp: a stride off powers of two keeps the tokens' rows out of each other's cache sets).
torch::Tensor matmul_expand(torch::Tensor x, torch::Tensor values, torch::Tensor masks, torch::Tensor offsets, int64_t isa) {
  check(values, masks, offsets, isa);
  const int64_t rows = masks.size(0), kb = masks.size(1), kp = 8 * kb;
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(1) == kp && x.stride(1) == 1 &&
              x.stride(0) >= kp, "x: float32 [tokens, kp], rows contiguous");
  const int64_t tokens = x.size(0), ldx = x.stride(0);
  auto y = torch::empty({tokens, rows}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint8_t* mp = masks.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
#ifdef LLMPRUNE_X86
  if (isa == AVX512_BF16 && values.scalar_type() == torch::kBFloat16 && tokens > 0) {
    auto xs = torch::empty({avx512bf16::kMaxParts * tokens * kp}, x.options().dtype(torch::kInt16));
    uint16_t* sp = reinterpret_cast<uint16_t*>(xs.data_ptr<int16_t>());
    const int parts = avx512bf16::split(xp, ldx, tokens, kp, sp);
    // One or two parts measured faster than the AVX-512F code everywhere (3.6-4.8× for bf16 x, 3-8% for fp16 x, Xeon);
    // three (x from fp32) a little slower on an Intel Xeon (2.63× against 2.88× dense fp32 on 11008×4096 at 50%, one
    // token) and 1.05-1.52× faster on an AMD EPYC Zen 4 (eval/ab_cpu_kernels.py, README "CPU kernels"), one token only.
    if (parts <= (tokens == 1 ? g_bf16_max_parts : 2)) {
      const bf16* vp = reinterpret_cast<const bf16*>(values.data_ptr());
      at::parallel_for(0, rows, grain(kp), [&](int64_t r0, int64_t r1) {
        for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
          const int tb = int(std::min<int64_t>(8, tokens - t0));
          avx512bf16::dot_rows(parts, tb, sp, tokens, t0, kp, vp, mp, kb, op, yp + t0 * rows, rows, r0, r1);
        }
      });
      return y;
    }
  }
#endif
  by_dtype(values, [&](auto tag) {
    using V = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    const V* vp = reinterpret_cast<const V*>(values.data_ptr());
    at::parallel_for(0, rows, grain(kp), [&](int64_t r0, int64_t r1) {
      for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
        const int tb = int(std::min<int64_t>(8, tokens - t0));
        const float* xt = xp + t0 * ldx;
        float* yt = yp + t0 * rows;
        LLMPRUNE_DISPATCH(isa, expand_rows(tb, xt, ldx, vp, mp, kb, op, yt, rows, r0, r1));
      }
    });
  });
  return y;
}

// How many bf16 parts the AVX512_BF16 path splits x [tokens, k] (fp32, rows contiguous) into: 1-3, or 4 where three
// do not hold it exactly.
int64_t bf16_parts(torch::Tensor x) {
  TORCH_CHECK(best_isa() >= AVX512_BF16, "this CPU lacks AVX-512 BF16 and VBMI2");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(1) % 16 == 0 && x.stride(1) == 1,
              "x: float32 [tokens, 16k], rows contiguous");
#ifdef LLMPRUNE_X86
  auto xs = torch::empty({avx512bf16::kMaxParts * x.size(0) * x.size(1)}, x.options().dtype(torch::kInt16));
  return avx512bf16::split(x.data_ptr<float>(), x.stride(0), x.size(0), x.size(1),
                           reinterpret_cast<uint16_t*>(xs.data_ptr<int16_t>()));
#else
  return 0;
#endif
}

// yT [rows, tp] = W xT, xT [kp, tp] (x transposed, tokens padded to tp, a multiple of the ISA's vector width).
torch::Tensor matmul_gather(torch::Tensor xT, torch::Tensor values, torch::Tensor masks, torch::Tensor offsets, int64_t isa) {
  check(values, masks, offsets, isa);
  const int64_t rows = masks.size(0), kb = masks.size(1), kp = 8 * kb;
  const int64_t width = isa >= AVX512 ? 16 : 8;
  TORCH_CHECK(xT.scalar_type() == torch::kFloat && xT.dim() == 2 && xT.size(0) == kp && xT.is_contiguous() &&
              xT.size(1) % width == 0, "xT: float32 [kp, tokens padded to the vector width]");
  const int64_t tp = xT.size(1);
  auto yT = torch::empty({rows, tp}, xT.options());
  const float* xp = xT.data_ptr<float>();
  float* yp = yT.data_ptr<float>();
  const uint8_t* mp = masks.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  by_dtype(values, [&](auto tag) {
    using V = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    const V* vp = reinterpret_cast<const V*>(values.data_ptr());
    at::parallel_for(0, rows, grain(kp), [&](int64_t r0, int64_t r1) {
      for (int64_t t0 = 0; t0 < tp;) {
        const int nv = int(std::min<int64_t>(8, (tp - t0) / width));
        LLMPRUNE_DISPATCH(isa, gather_rows(nv, xp, tp, t0, vp, mp, kb, op, yp, r0, r1));
        t0 += nv * width;
      }
    });
  });
  return yT;
}

// y = x Wᵀ for many tokens: blocks of `block` rows are expanded into a buffer the caches hold, each followed by
// torch's GEMM on it, written straight into y's columns, so the dense weight never goes to memory (and no large
// buffer is allocated and faulted in on each call). x [tokens, kp] fp32, rows contiguous; returns y [tokens, rows].
torch::Tensor matmul_blocked(torch::Tensor x, torch::Tensor values, torch::Tensor masks, torch::Tensor offsets,
                             int64_t isa, int64_t block) {
  check(values, masks, offsets, isa);
  const int64_t rows = masks.size(0), kb = masks.size(1), kp = 8 * kb;
  const bool half = x.scalar_type() != torch::kFloat;
  TORCH_CHECK((!half || x.scalar_type() == values.scalar_type()) && x.dim() == 2 && x.size(1) == kp &&
              x.stride(1) == 1, "x: float32, or the values' 16-bit dtype, [tokens, kp], rows contiguous");
  TORCH_CHECK(block > 0, "block must be positive");
  auto y = torch::empty({x.size(0), rows}, x.options());
  auto buffer = torch::empty({std::min(block, rows), kp}, x.options());
  const uint8_t* mp = masks.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  if (half) {  // 16-bit activations and values: 16-bit blocks for torch's GEMM in that dtype, as the dense model runs
    uint16_t* bp = reinterpret_cast<uint16_t*>(buffer.data_ptr());
    const uint16_t* vp = reinterpret_cast<const uint16_t*>(values.data_ptr());
    for (int64_t b0 = 0; b0 < rows; b0 += block) {
      const int64_t nb = std::min(block, rows - b0);
      uint16_t* origin = bp - b0 * kp;
      at::parallel_for(b0, b0 + nb, grain(kp), [&](int64_t r0, int64_t r1) {
#ifdef LLMPRUNE_X86
        if (isa == AVX512_BF16) return avx512bf16::dense_rows16(vp, mp, kb, op, origin, r0, r1);
#endif
        dense_rows16(vp, mp, kb, op, origin, r0, r1);
      });
      auto out = y.narrow(1, b0, nb);
      at::mm_out(out, x, buffer.narrow(0, 0, nb).t());
    }
    return y;
  }
  float* bp = buffer.data_ptr<float>();
  by_dtype(values, [&](auto tag) {
    using V = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    const V* vp = reinterpret_cast<const V*>(values.data_ptr());
    for (int64_t b0 = 0; b0 < rows; b0 += block) {
      const int64_t nb = std::min(block, rows - b0);
      // dense_rows writes row n at out + n·kp: shift the buffer's origin so that row b0 lands at its start
      float* origin = bp - b0 * kp;
      at::parallel_for(b0, b0 + nb, grain(kp), [&](int64_t r0, int64_t r1) {
        LLMPRUNE_DISPATCH(isa, dense_rows(vp, mp, kb, op, origin, r0, r1));
      });
      auto out = y.narrow(1, b0, nb);  // columns of y: a strided view, which torch's GEMM writes in place
      at::mm_out(out, x, buffer.narrow(0, 0, nb).t());
    }
  });
  return y;
}

// y [tokens, rows] = x [tokens, cols] wᵀ for a weight kept dense (w fp32, bf16 or fp16 [rows, cols], rows
// contiguous; x fp32), fp32 sums, tokens 8 at a time: see dense_dot_rows_t.
torch::Tensor matmul_dense(torch::Tensor x, torch::Tensor w, int64_t isa) {
  TORCH_CHECK(isa >= PORTABLE && isa <= best_isa(), "this CPU lacks the instruction set asked for");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.stride(1) == 1, "w: a CPU tensor [rows, cols], rows contiguous");
  const int64_t rows = w.size(0), cols = w.size(1);
  TORCH_CHECK(x.scalar_type() == torch::kFloat && x.dim() == 2 && x.size(1) == cols && x.stride(1) == 1 &&
              x.device().is_cpu(), "x: float32 [tokens, cols], rows contiguous");
  const int64_t tokens = x.size(0), ldx = x.stride(0), ldw = w.stride(0);
  auto y = torch::empty({tokens, rows}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  by_dtype(w, [&](auto tag) {
    using V = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    const V* wp = reinterpret_cast<const V*>(w.data_ptr());
    at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
      for (int64_t t0 = 0; t0 < tokens; t0 += 8) {
        const int tb = int(std::min<int64_t>(8, tokens - t0));
        LLMPRUNE_DISPATCH(isa, dense_dot_rows(tb, xp + t0 * ldx, ldx, wp, ldw, cols, yp + t0 * rows, rows, r0, r1));
      }
    });
  });
  return y;
}

// The dense fp32 weight [rows, kp] (zeros where the mask has none).
torch::Tensor expand(torch::Tensor values, torch::Tensor masks, torch::Tensor offsets, int64_t isa) {
  check(values, masks, offsets, isa);
  const int64_t rows = masks.size(0), kb = masks.size(1), kp = 8 * kb;
  auto out = torch::empty({rows, kp}, torch::TensorOptions().dtype(torch::kFloat));
  float* dp = out.data_ptr<float>();
  const uint8_t* mp = masks.data_ptr<uint8_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  by_dtype(values, [&](auto tag) {
    using V = std::remove_cv_t<std::remove_pointer_t<decltype(tag)>>;
    const V* vp = reinterpret_cast<const V*>(values.data_ptr());
    at::parallel_for(0, rows, grain(kp), [&](int64_t r0, int64_t r1) {
      LLMPRUNE_DISPATCH(isa, dense_rows(vp, mp, kb, op, dp, r0, r1));
    });
  });
  return out;
}

}  // namespace llmprune_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("threaded", &llmprune_common::threaded, "whether the build runs on torch's OpenMP thread pool");
  m.def("cpu_vendor", &llmprune_cpu::cpu_vendor, "intel, amd or other");
  m.def("set_fp32_expand_load", &llmprune_cpu::set_fp32_expand_load, "AVX-512 fp32 values: vexpandps from memory (else table permutations)");
  m.def("fp32_expand_load", &llmprune_cpu::fp32_expand_load, "whether the AVX-512 fp32 expansion loads with vexpandps");
  m.def("set_bf16_max_parts", &llmprune_cpu::set_bf16_max_parts, "AVX512_BF16 bf16 values: the most bf16 parts of x (2, or 3 for fp32 x) taken as dot products");
  m.def("bf16_max_parts", &llmprune_cpu::bf16_max_parts, "the most bf16 parts of x the dot products take");
  m.def("best_isa", &llmprune_cpu::best_isa, "0 portable, 1 AVX2+FMA+F16C, 2 AVX-512F, 3 AVX-512 with BF16 and VBMI2: the best this CPU runs");
  m.def("matmul_expand", &llmprune_cpu::matmul_expand, "y = x W^T, weights expanded in registers (decode)");
  m.def("bf16_parts", &llmprune_cpu::bf16_parts, "how many bf16 parts hold x exactly (the AVX512_BF16 path's split)");
  m.def("matmul_gather", &llmprune_cpu::matmul_gather, "y^T = W x^T, kept values broadcast over tokens");
  m.def("matmul_blocked", &llmprune_cpu::matmul_blocked, "y = x W^T, row blocks expanded for torch's GEMM");
  m.def("expand", &llmprune_cpu::expand, "the dense float32 weight [rows, kp]");
  m.def("matmul_dense", &llmprune_cpu::matmul_dense, "y = x W^T for a weight kept dense (decode)");
}
