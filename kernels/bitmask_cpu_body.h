// The kernels' body, included once per instruction set by bitmask_cpu.cpp inside a namespace that defines
// `Ops` (vector type F of W floats; one mask unit is W bits, so a row has kp / W units). No include guard: it is
// meant to be included more than once. See bitmask_cpu.cpp for the layout.

using F = typename Ops::F;
constexpr int W = Ops::W;

// T tokens (1-8) against rows r0..r1. Two chains of accumulators for 1-4 tokens, so a token's sums do not wait
// on each other's latency.
template <class V, int T>
void expand_rows_t(const float* x, int64_t ldx, const V* values, const uint8_t* masks, int64_t kb,
                   const int64_t* offsets, float* y, int64_t ldy, int64_t r0, int64_t r1) {
  constexpr int S = T <= 4 ? 2 : 1;
  const int64_t units = 8 * kb / W;  // a multiple of S: kb is a multiple of 8
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = masks + n * kb;
    const V* p = values + offsets[n];
    F acc[S][T];
    for (int s = 0; s < S; ++s)
      for (int t = 0; t < T; ++t) acc[s][t] = Ops::zero();
    for (int64_t c = 0; c < units; c += S) {
#pragma GCC unroll 2
      for (int s = 0; s < S; ++s) {
        const unsigned m = Ops::mask(row, c + s);
        const F w = Ops::expand(m, p);
        p += popcount(m);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) acc[s][t] = Ops::fma(w, Ops::load(x + t * ldx + (c + s) * W), acc[s][t]);
      }
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

// Rows r0..r1 of the dense fp32 weight [rows, 8·kb].
template <class V>
void dense_rows(const V* values, const uint8_t* masks, int64_t kb, const int64_t* offsets, float* out, int64_t r0,
                int64_t r1) {
  const int64_t kp = 8 * kb, units = kp / W;
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* row = masks + n * kb;
    const V* p = values + offsets[n];
    float* o = out + n * kp;
    for (int64_t c = 0; c < units; ++c) {
      const unsigned m = Ops::mask(row, c);
      Ops::store(o + c * W, Ops::expand(m, p));
      p += popcount(m);
    }
  }
}
