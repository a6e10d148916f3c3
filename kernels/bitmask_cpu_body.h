// The kernels' body, included once per instruction set by bitmask_cpu.cpp inside a namespace that defines
// `Ops` (vector type F of W floats; one mask unit is W bits, so a row has kp / W units). No include guard: it is
// meant to be included more than once. See bitmask_cpu.cpp for the layout.

using F = typename Ops::F;
constexpr int W = Ops::W;

// Where unit g of a 64-input mask word starts among the kept values that begin at p: past the bits below it.
template <class V> inline const V* unit_values(const V* p, uint64_t word, int g) {
  return p + (g ? __builtin_popcountll(word << (64 - g * W)) : 0);
}

// T tokens (1-8) against rows r0..r1. Two chains of accumulators for 1-4 tokens, so a token's sums do not wait
// on each other's latency. The mask is read 64 bits at a time and each unit's values found by the popcount of the
// bits before it, so the one serial chain (the row's value pointer) advances once per 64 inputs, not once per unit
// (1.05-1.3x at one token on an Intel Xeon before prefetching came). The values and masks ahead are prefetched
// (prefetch_ahead).
template <class V, int T>
void expand_rows_t(const float* x, int64_t ldx, const V* values, const uint8_t* masks, int64_t kb,
                   const int64_t* offsets, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int S = T <= 4 ? 2 : 1;
  constexpr int G = 64 / W;  // units a 64-bit mask word holds: a multiple of S
  constexpr uint64_t unit = (uint64_t(1) << W) - 1;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = masks + n * kb;
    const V* p = values + offsets[n];
    F acc[S][T];
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < T; ++t) acc[s][t] = Ops::zero();
    for (int64_t j = 0; j < kb / 8; ++j) {
      uint64_t word;
      std::memcpy(&word, row + 8 * j, 8);
      const float* xj = x + j * 64;
      prefetch_ahead(p, row + 8 * j);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const unsigned m = unsigned((word >> (g * W)) & unit);
        const F w = Ops::expand(m, unit_values(p, word, g));
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[g % S][t] = Ops::fma(w, Ops::load(xj + t * ldx + g * W), acc[g % S][t]);
      }
      p += __builtin_popcountll(word);
    }
    for (int t = 0; t < T; ++t) {
      F sum = acc[0][t];
      for (int s = 1; s < S; ++s) sum = Ops::add(sum, acc[s][t]);
      y[t * ldy + n] = Ops::hsum(sum);
    }
  }
}

template <class V>
void expand_rows(int tokens, const float* x, int64_t ldx, const V* values, const uint8_t* masks, int64_t kb,
                 const int64_t* offsets, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  switch (tokens) {
    case 1: expand_rows_t<V, 1>(x, ldx, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 2: expand_rows_t<V, 2>(x, ldx, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 3: expand_rows_t<V, 3>(x, ldx, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 4: expand_rows_t<V, 4>(x, ldx, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 5: expand_rows_t<V, 5>(x, ldx, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 6: expand_rows_t<V, 6>(x, ldx, values, masks, kb, offsets, y, ldy, r0, r1); break;
    case 7: expand_rows_t<V, 7>(x, ldx, values, masks, kb, offsets, y, ldy, r0, r1); break;
    default: expand_rows_t<V, 8>(x, ldx, values, masks, kb, offsets, y, ldy, r0, r1); break;
  }
}

// NV vectors of tokens (NV·W tokens from t0) against rows r0..r1: each kept value is broadcast and multiplied by
// its input's tokens (a row of xT). S chains of accumulators take kept values in turn, so that about 8 fused
// multiply-adds are in flight whatever NV is.
template <class V, int NV>
void gather_rows_t(const float* xT, int64_t tp, int64_t t0, const V* values, const uint8_t* masks, int64_t kb,
                   const int64_t* offsets, float* yT, int64_t r0, int64_t r1) {
  constexpr int S = NV >= 8 ? 1 : NV >= 4 ? 2 : 4;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = masks + n * kb;
    const V* p = values + offsets[n];
    F acc[S][NV];
    for (int s = 0; s < S; ++s)
      for (int v = 0; v < NV; ++v) acc[s][v] = Ops::zero();
    const float* base = xT + t0;
    for (int64_t j = 0; j < kb / 8; ++j, base += 64 * tp) {
      uint64_t word;
      std::memcpy(&word, row + 8 * j, 8);
      int count = __builtin_popcountll(word);
      for (; count >= S; count -= S) {
#pragma GCC unroll 4
        for (int s = 0; s < S; ++s) {
          const float* xr = base + __builtin_ctzll(word) * tp;
          word &= word - 1;
          const F w = Ops::broadcast(p++);
#pragma GCC unroll 8
          for (int v = 0; v < NV; ++v) acc[s][v] = Ops::fma(w, Ops::load(xr + v * W), acc[s][v]);
        }
      }
      for (; count > 0; --count) {
        const float* xr = base + __builtin_ctzll(word) * tp;
        word &= word - 1;
        const F w = Ops::broadcast(p++);
        for (int v = 0; v < NV; ++v) acc[0][v] = Ops::fma(w, Ops::load(xr + v * W), acc[0][v]);
      }
    }
    for (int v = 0; v < NV; ++v) {
      F sum = acc[0][v];
      for (int s = 1; s < S; ++s) sum = Ops::add(sum, acc[s][v]);
      Ops::store(yT + n * tp + t0 + v * W, sum);
    }
  }
}

template <class V>
void gather_rows(int nv, const float* xT, int64_t tp, int64_t t0, const V* values, const uint8_t* masks, int64_t kb,
                 const int64_t* offsets, float* yT, int64_t r0, int64_t r1) {
  switch (nv) {
    case 1: gather_rows_t<V, 1>(xT, tp, t0, values, masks, kb, offsets, yT, r0, r1); break;
    case 2: gather_rows_t<V, 2>(xT, tp, t0, values, masks, kb, offsets, yT, r0, r1); break;
    case 3: gather_rows_t<V, 3>(xT, tp, t0, values, masks, kb, offsets, yT, r0, r1); break;
    case 4: gather_rows_t<V, 4>(xT, tp, t0, values, masks, kb, offsets, yT, r0, r1); break;
    case 5: gather_rows_t<V, 5>(xT, tp, t0, values, masks, kb, offsets, yT, r0, r1); break;
    case 6: gather_rows_t<V, 6>(xT, tp, t0, values, masks, kb, offsets, yT, r0, r1); break;
    case 7: gather_rows_t<V, 7>(xT, tp, t0, values, masks, kb, offsets, yT, r0, r1); break;
    default: gather_rows_t<V, 8>(xT, tp, t0, values, masks, kb, offsets, yT, r0, r1); break;
  }
}

// T tokens (1-8) against rows r0..r1 of a weight kept dense, w [rows, cols] with row stride ldw (any cols: the last
// cols % (S·W) inputs are summed one by one). For the linears a pruned model leaves dense (a tied lm_head), whose
// one-token product torch hands to MKL, which streams 7-10 GB/s on an AMD EPYC (Zen 4, 2 cores) against the 25-35 of
// these loops. Each thread's rows are one contiguous stream, prefetched a fixed distance ahead into L2.
template <class V, int T>
void dense_dot_rows_t(const float* x, int64_t ldx, const V* w, int64_t ldw, int64_t cols, float* y, int64_t ldy,
                      int64_t r0, int64_t r1) {
  constexpr int S = T <= 4 ? 2 : 1;
  constexpr int64_t ahead = kValuesAhead / int64_t(sizeof(V));
  const int64_t main = cols / (S * W) * (S * W);
  for (int64_t n = r0; n < r1; ++n) {
    const V* row = w + n * ldw;
    F acc[S][T];
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < T; ++t) acc[s][t] = Ops::zero();
    for (int64_t k = 0; k < main; k += S * W) {
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) {
        __builtin_prefetch(row + k + s * W + ahead, 0, 2);  // a line a vector (fp32 AVX-512; 16-bit: two a line)
        const F wv = Ops::loadw(row + k + s * W);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[s][t] = Ops::fma(wv, Ops::load(x + t * ldx + k + s * W), acc[s][t]);
      }
    }
    for (int t = 0; t < T; ++t) {
      F sum = acc[0][t];
      for (int s = 1; s < S; ++s) sum = Ops::add(sum, acc[s][t]);
      float tail = 0;
      for (int64_t k = main; k < cols; ++k) tail += to_float(row[k]) * x[t * ldx + k];
      y[t * ldy + n] = Ops::hsum(sum) + tail;
    }
  }
}

template <class V>
void dense_dot_rows(int tokens, const float* x, int64_t ldx, const V* w, int64_t ldw, int64_t cols, float* y,
                    int64_t ldy, int64_t r0, int64_t r1) {
  switch (tokens) {
    case 1: dense_dot_rows_t<V, 1>(x, ldx, w, ldw, cols, y, ldy, r0, r1); break;
    case 2: dense_dot_rows_t<V, 2>(x, ldx, w, ldw, cols, y, ldy, r0, r1); break;
    case 3: dense_dot_rows_t<V, 3>(x, ldx, w, ldw, cols, y, ldy, r0, r1); break;
    case 4: dense_dot_rows_t<V, 4>(x, ldx, w, ldw, cols, y, ldy, r0, r1); break;
    case 5: dense_dot_rows_t<V, 5>(x, ldx, w, ldw, cols, y, ldy, r0, r1); break;
    case 6: dense_dot_rows_t<V, 6>(x, ldx, w, ldw, cols, y, ldy, r0, r1); break;
    case 7: dense_dot_rows_t<V, 7>(x, ldx, w, ldw, cols, y, ldy, r0, r1); break;
    default: dense_dot_rows_t<V, 8>(x, ldx, w, ldw, cols, y, ldy, r0, r1); break;
  }
}

// Rows r0..r1 of the dense fp32 weight [rows, 8·kb] (the mask read 64 bits at a time, as in expand_rows_t).
template <class V>
void dense_rows(const V* values, const uint8_t* masks, int64_t kb, const int64_t* offsets, float* out, int64_t r0,
                int64_t r1) {
  constexpr int G = 64 / W;
  constexpr uint64_t unit = (uint64_t(1) << W) - 1;
  const int64_t kp = 8 * kb;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = masks + n * kb;
    const V* p = values + offsets[n];
    float* o = out + n * kp;
    for (int64_t j = 0; j < kb / 8; ++j, o += 64) {
      uint64_t word;
      std::memcpy(&word, row + 8 * j, 8);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const unsigned m = unsigned((word >> (g * W)) & unit);
        Ops::store(o + g * W, Ops::expand(m, unit_values(p, word, g)));
      }
      p += __builtin_popcountll(word);
    }
  }
}
