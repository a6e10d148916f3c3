// Decode-time product with a 2:4 weight: y[b, o] = sum_i W[o, i] * x[b, i].
//
// Each group of 4 inputs of a row keeps exactly 2 values (`values[o, 2g]`, `values[o, 2g + 1]`) and their
// positions in the group as two 2-bit indices, packed at load into one 4-bit code per group, 8 groups per
// 32-bit word (`meta[o, g / 8]`, group g in bits 4*(g % 8) .. +3: low 2 bits the first index). One warp owns
// one output row; each lane reads 8 consecutive values (4 groups, 16 bytes) and their 16 bits of metadata.
// Bytes moved: half the weights plus 4 bits per group of 4 (9 bits per weight for fp16), vs 16 dense.
#include "common.cuh"

template <typename T, int MAXB>
__device__ void sparse24_gemv(const T* __restrict__ values, const unsigned* __restrict__ meta,
                              const T* __restrict__ x, T* __restrict__ y, int rows, int cols, int batch) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int groups = cols / 4;  // cols is a multiple of 4 (checked on the host)
    const int kept = cols / 2;
    const int meta_words = (groups + 7) / 8;
    float acc[MAXB];
#pragma unroll
    for (int b = 0; b < MAXB; ++b) acc[b] = 0.f;
    const T* row_values = values + (size_t)row * kept;
    const unsigned* row_meta = meta + (size_t)row * meta_words;
    for (int g0 = lane * 4; g0 < groups; g0 += 32 * 4) {  // 4 groups per lane per step
        const unsigned word = row_meta[g0 / 8];
        const unsigned codes = word >> (4 * (g0 % 8));  // g0 % 8 is 0 or 4
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int g = g0 + q;
            if (g >= groups) break;
            const unsigned code = (codes >> (4 * q)) & 0xfu;
            const int i0 = 4 * g + (code & 3u), i1 = 4 * g + (code >> 2);
            const float v0 = to_float(row_values[2 * g]), v1 = to_float(row_values[2 * g + 1]);
#pragma unroll
            for (int b = 0; b < MAXB; ++b)
                if (b < batch) acc[b] += v0 * to_float(x[(size_t)b * cols + i0]) + v1 * to_float(x[(size_t)b * cols + i1]);
        }
    }
    store_row<T, MAXB>(acc, y, rows, row, batch, lane);
}

#define DEFINE(NAME, T, MAXB)                                                                                    \
    extern "C" __global__ void NAME(const T* values, const unsigned* meta, const T* x, T* y, int rows, int cols, \
                                    int batch) {                                                                 \
        sparse24_gemv<T, MAXB>(values, meta, x, y, rows, cols, batch);                                           \
    }

DEFINE(sparse24_gemv_f16_b4, __half, 4)
DEFINE(sparse24_gemv_f16_b16, __half, 16)
DEFINE(sparse24_gemv_bf16_b4, __nv_bfloat16, 4)
DEFINE(sparse24_gemv_bf16_b16, __nv_bfloat16, 16)
