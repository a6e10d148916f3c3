// y = x W^T with an unstructured sparse weight (any sparsity), loaded as sparse and computed as dense: each
// compressed tile is expanded in shared memory and registers into dense tensor-core operands (mma.sync
// m16n8k16, sm_80 and newer), so memory traffic shrinks with sparsity (Flash-LLM's idea, Xia et al. 2023).
//
// Layout, packed once at load by kernels.pack_bitmask_tiles: tiles of 16 rows x 32 inputs. In a tile, lane
// 4g + t owns 16 weights, element e = 8 * s + 2 * r + h being operand-A register r (0..3), half h of the
// 16-input step s (0, 1); `masks[tile * 32 + lane]` has bit e set where that weight is kept. The kept values
// follow lane by lane, element by element, from `values[offsets[tile]]` (16-byte units; each tile padded to
// 16 bytes). Bytes per weight: the kept values, 1 bit of mask, and 4 bytes per tile of offsets.
#include "mma.cuh"

// Expand one tile into this lane's operand-A registers: a[0..3] for inputs 0..15, a[4..7] for 16..31.
// `stage` is this warp's 1 KB of shared memory.
__device__ __forceinline__ void expand_tile(unsigned (&a)[8], const uint4* __restrict__ values,
                                            const int* __restrict__ offsets, const unsigned short* __restrict__ masks,
                                            size_t tile, uint4* stage, int lane) {
    const unsigned mask = masks[tile * 32 + lane];
    const int first = offsets[tile], chunks = offsets[tile + 1] - first;
    if (lane < chunks) stage[lane] = __ldcs(values + first + lane);
    if (lane + 32 < chunks) stage[lane + 32] = __ldcs(values + first + lane + 32);
    const int count = __popc(mask);
    int before = count;  // inclusive prefix sum over the lanes
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, before, d);
        if (lane >= d) before += up;
    }
    __syncwarp();
    const unsigned short* mine = reinterpret_cast<const unsigned short*>(stage) + (before - count);
    int k = 0;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        const bool lo = (mask >> (2 * r)) & 1u, hi = (mask >> (2 * r + 1)) & 1u;
        const unsigned v0 = lo ? mine[k] : 0u;
        k += lo;
        const unsigned v1 = hi ? mine[k] : 0u;
        k += hi;
        a[r] = v0 | (v1 << 16);
    }
    __syncwarp();
}

template <typename T, int NT, int WARPS>
__device__ void bitmask_decode(const uint4* __restrict__ values, const int* __restrict__ offsets,
                               const unsigned short* __restrict__ masks, const T* __restrict__ x, T* __restrict__ y,
                               int rows, int k_tiles, int stride, int batch) {
    __shared__ float partial[WARPS][NT][4][32];
    __shared__ uint4 stages[WARPS][64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int mt = blockIdx.x;
    const T* x_row[NT];
    bool x_ok[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int n = 8 * nt + g;
        x_ok[nt] = n < batch;
        x_row[nt] = x + (size_t)(x_ok[nt] ? n : 0) * stride;
    }
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    for (int kt = warp; kt < k_tiles; kt += WARPS) {
        unsigned b[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) load_tokens<T>(b[nt], x_row[nt], x_ok[nt], kt * 32, t, stride);
        unsigned a[8];
        expand_tile(a, values, offsets, masks, (size_t)mt * k_tiles + kt, stages[warp], lane);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            mma_16816<T>(acc[nt], a[0], a[1], a[2], a[3], b[nt][0], b[nt][1]);
            mma_16816<T>(acc[nt], a[4], a[5], a[6], a[7], b[nt][2], b[nt][3]);
        }
    }
    reduce_and_store<T, NT, WARPS>(acc, partial, y, rows, batch, mt, warp, lane);
}

template <typename T>
__device__ void bitmask_gemm(const uint4* __restrict__ values, const int* __restrict__ offsets,
                             const unsigned short* __restrict__ masks, const T* __restrict__ x, T* __restrict__ y,
                             int rows, int m_tiles, int k_tiles, int stride, int tokens) {
    using namespace gemm;
    __shared__ __align__(128) Stage stages[STAGES];
    __shared__ uint4 expand[WARPS][64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp & 3, wn = warp >> 2;
    const int n0 = blockIdx.x * BN, row0 = blockIdx.y * BM + wm * 32;
    const int mt0 = row0 / 16;
    float acc[2][8][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mi][j][i] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage<T>(stages[s], x, tokens, stride, n0, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        unsigned a[2][8];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
            if (mt0 + mi < m_tiles) expand_tile(a[mi], values, offsets, masks, (size_t)(mt0 + mi) * k_tiles + kt, expand[warp], lane);
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int next = kt + STAGES - 1;
        if (next < k_tiles) load_stage<T>(stages[next % STAGES], x, tokens, stride, n0, next);
        cp_async_commit();
        const Stage& s = stages[kt % STAGES];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            unsigned b[4];
            stage_fragment(b, s, wn * 64 + 8 * j, lane);
#pragma unroll
            for (int mi = 0; mi < 2; ++mi)
                if (mt0 + mi < m_tiles) {
                    mma_16816<T>(acc[mi][j], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[0], b[1]);
                    mma_16816<T>(acc[mi][j], a[mi][4], a[mi][5], a[mi][6], a[mi][7], b[2], b[3]);
                }
        }
    }
    store_tile<T>(acc, y, rows, tokens, row0, n0 + wn * 64, lane);
}

#define DECODE(NAME, T, NT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) NAME(const uint4* values, const int* offsets,                  \
                                                            const unsigned short* masks, const T* x, T* y, int rows, \
                                                            int k_tiles, int stride, int batch) {                     \
        bitmask_decode<T, NT, 8>(values, offsets, masks, x, y, rows, k_tiles, stride, batch);                       \
    }
#define GEMM(NAME, T)                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) NAME(const uint4* values, const int* offsets,                  \
                                                            const unsigned short* masks, const T* x, T* y, int rows, \
                                                            int m_tiles, int k_tiles, int stride, int tokens) {       \
        bitmask_gemm<T>(values, offsets, masks, x, y, rows, m_tiles, k_tiles, stride, tokens);                      \
    }

DECODE(bitmask_decode_f16_n1, __half, 1)
DECODE(bitmask_decode_f16_n2, __half, 2)
DECODE(bitmask_decode_bf16_n1, __nv_bfloat16, 1)
DECODE(bitmask_decode_bf16_n2, __nv_bfloat16, 2)
GEMM(bitmask_gemm_f16, __half)
GEMM(bitmask_gemm_bf16, __nv_bfloat16)
