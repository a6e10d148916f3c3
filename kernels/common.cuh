// Helpers shared by the decode kernels: 16-bit <-> float conversion, and the warp reduction that writes
// one output row's results for every token.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Sum each token's partial results over the warp; lane 0 writes y[b, row].
template <typename T, int MAXB>
__device__ __forceinline__ void store_row(const float (&acc)[MAXB], T* __restrict__ y, int rows, int row, int batch,
                                          int lane) {
#pragma unroll
    for (int b = 0; b < MAXB; ++b) {
        if (b >= batch) break;
        float s = acc[b];
#pragma unroll
        for (int d = 16; d > 0; d >>= 1) s += __shfl_down_sync(0xffffffffu, s, d);
        if (lane == 0) y[(size_t)b * rows + row] = from_float<T>(s);
    }
}
