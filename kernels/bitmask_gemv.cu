// Decode-time product with an unstructured bitmask-compressed weight: y[b, o] = sum_i W[o, i] * x[b, i].
//
// W is stored per output row o as its kept values (row-major, `values[row_start[o] ...]`) and a bitmask
// repacked at load into 32-bit words: bit t of words[o, w] flags input 32*w + t as kept. One warp owns one
// output row: each lane takes one word of a 1024-input chunk, a warp prefix sum of the words' popcounts
// tells each lane where its values start, and the lane multiplies its kept values with the matching
// inputs. Memory traffic is the kept values plus one bit per weight, so it shrinks with sparsity.
//
// T: __half or __nv_bfloat16 (values and x), accumulation in float. MAXB: the most tokens per launch
// (the accumulators live in registers, indexed only with compile-time constants).
#include "common.cuh"

template <typename T, int MAXB>
__device__ void bitmask_gemv(const T* __restrict__ values, const int* __restrict__ row_start,
                             const unsigned* __restrict__ words, const T* __restrict__ x, T* __restrict__ y,
                             int rows, int cols, int words_per_row, int batch) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    float acc[MAXB];
#pragma unroll
    for (int b = 0; b < MAXB; ++b) acc[b] = 0.f;
    int base = row_start[row];  // index in `values` of the chunk's first kept value
    const unsigned* row_words = words + (size_t)row * words_per_row;
    for (int chunk = 0; chunk < words_per_row; chunk += 32) {
        const int w = chunk + lane;
        unsigned bits = w < words_per_row ? row_words[w] : 0u;
        const int count = __popc(bits);
        int before = count;  // inclusive prefix sum of the popcounts over the warp
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int up = __shfl_up_sync(0xffffffffu, before, d);
            if (lane >= d) before += up;
        }
        const int total = __shfl_sync(0xffffffffu, before, 31);
        int k = base + before - count;
        while (bits) {
            const int t = __ffs(bits) - 1;
            bits &= bits - 1;
            const float v = to_float(values[k++]);
            const int i = 32 * w + t;
#pragma unroll
            for (int b = 0; b < MAXB; ++b)
                if (b < batch) acc[b] += v * to_float(x[(size_t)b * cols + i]);
        }
        base += total;
    }
    store_row<T, MAXB>(acc, y, rows, row, batch, lane);
}

#define DEFINE(NAME, T, MAXB)                                                                                  \
    extern "C" __global__ void NAME(const T* values, const int* row_start, const unsigned* words, const T* x, \
                                    T* y, int rows, int cols, int words_per_row, int batch) {                 \
        bitmask_gemv<T, MAXB>(values, row_start, words, x, y, rows, cols, words_per_row, batch);              \
    }

DEFINE(bitmask_gemv_f16_b4, __half, 4)
DEFINE(bitmask_gemv_f16_b16, __half, 16)
DEFINE(bitmask_gemv_bf16_b4, __nv_bfloat16, 4)
DEFINE(bitmask_gemv_bf16_b16, __nv_bfloat16, 16)
