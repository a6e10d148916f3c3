// y = x W^T with a 2:4 weight on the sparse tensor cores (mma.sp, sm_80 and newer), for decode (at most 16
// tokens) and prefill (any number of tokens).
//
// Layout, packed once at load by kernels.pack_24_tiles: the weight is cut into tiles of 16 rows x 32 inputs
// (rows padded to 16, inputs to 32). Tile (mt, kt) is `values[(mt * k_tiles + kt) * 32 + lane]`: 16 bytes per
// lane, already the lane's operand-A registers (two kept values of one group of four per register), so a
// warp reads a tile with one coalesced 512-byte load. `meta[(mt * k_tiles + kt) * 16 + 2 * g + t]` (t = 0, 1)
// is the metadata register of lane 4g + t. Bytes per weight: half the values plus 1 bit (9 bits in fp16).
#include "mma.cuh"

// Decode launch shape: warps per block (the host launches 32 x this many threads) and 32-input steps in flight
// per warp. Defaults measured on an H200 (eval/tune_decode.py tries others).
#ifndef SPARSE24_DECODE_WARPS
#define SPARSE24_DECODE_WARPS 8
#endif
#ifndef SPARSE24_DECODE_STEPS
#define SPARSE24_DECODE_STEPS 4
#endif

// Decode: one block per 16-row tile; its warps take the 32-input steps round robin and sum at the end.
template <typename T, int NT, int WARPS, int U>
__device__ void sparse24_decode(const uint4* __restrict__ values, const unsigned* __restrict__ meta,
                                const T* __restrict__ x, T* __restrict__ y, int rows, int k_tiles, int stride,
                                int batch) {
    __shared__ float partial[WARPS][NT][4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int mt = blockIdx.x;
    const uint4* tile_values = values + (size_t)mt * k_tiles * 32 + lane;
    const unsigned* tile_meta = meta + (size_t)mt * k_tiles * 16 + 2 * g + (t & 1);
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

    for (int kt0 = warp; kt0 < k_tiles; kt0 += U * WARPS) {  // U steps in flight: all loads before the first mma
        uint4 a[U];
        unsigned e[U], b[U][NT][4];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int kt = kt0 + u * WARPS;
            if (kt < k_tiles) {
                a[u] = __ldcs(tile_values + (size_t)kt * 32);
                e[u] = __ldcs(tile_meta + (size_t)kt * 16);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) load_tokens<T>(b[u][nt], x_row[nt], x_ok[nt], kt * 32, t, stride);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (kt0 + u * WARPS < k_tiles)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_sp_16832<T>(acc[nt], a[u], b[u][nt], e[u]);
    }
    reduce_and_store<T, NT, WARPS>(acc, partial, y, rows, batch, mt, warp, lane);
}

// Prefill: the GEMM skeleton of mma.cuh with operand A read straight from the packed tiles.
template <typename T>
__device__ void sparse24_gemm(const uint4* __restrict__ values, const unsigned* __restrict__ meta,
                              const T* __restrict__ x, T* __restrict__ y, int rows, int m_tiles, int k_tiles,
                              int stride, int tokens) {
    using namespace gemm;
    __shared__ __align__(128) Stage stages[STAGES];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
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
    // Operand A of the next step is loaded a step ahead, so its latency hides behind this step's mma.
    uint4 a[2], a_next[2];
    unsigned e[2], e_next[2];
    auto load_a = [&](uint4 (&av)[2], unsigned (&ev)[2], int kt) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
            if (mt0 + mi < m_tiles && kt < k_tiles) {
                const size_t tile = (size_t)(mt0 + mi) * k_tiles + kt;
                av[mi] = __ldg(values + tile * 32 + lane);
                ev[mi] = __ldg(meta + tile * 16 + 2 * g + (t & 1));
            }
    };
    load_a(a_next, e_next, 0);
    for (int kt = 0; kt < k_tiles; ++kt) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) a[mi] = a_next[mi], e[mi] = e_next[mi];
        load_a(a_next, e_next, kt + 1);
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
                if (mt0 + mi < m_tiles) mma_sp_16832<T>(acc[mi][j], a[mi], b, e[mi]);
        }
    }
    store_tile<T>(acc, y, rows, tokens, row0, n0 + wn * 64, lane);
}

// The dense weight [m_tiles * 16, k_tiles * 32] of the tiles, one warp per tile: for prefill through cuBLAS.
// Each lane writes its four groups of four (two kept values, two zeros) as 8-byte stores.
__device__ void sparse24_expand(const uint4* __restrict__ values, const unsigned* __restrict__ meta,
                                unsigned short* __restrict__ dense, int tiles, int k_tiles) {
    const int lane = threadIdx.x & 31;
    const int tile = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (tile >= tiles) return;
    const int g = lane >> 2, t = lane & 3, mt = tile / k_tiles, kt = tile % k_tiles;
    const uint4 v = values[(size_t)tile * 32 + lane];
    const unsigned words[2] = {meta[(size_t)tile * 16 + 2 * g], meta[(size_t)tile * 16 + 2 * g + 1]};
    const unsigned regs[4] = {v.x, v.y, v.z, v.w};
    const size_t stride = (size_t)k_tiles * 32;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int row = 16 * mt + g + 8 * (r & 1), group = t + 4 * (r >> 1);
        const unsigned code = (words[r >> 1] >> (16 * (r & 1) + 4 * t)) & 0xfu;
        unsigned out[4];
#pragma unroll
        for (int p = 0; p < 4; ++p)
            out[p] = p == (int)(code & 3u) ? (regs[r] & 0xffffu) : (p == (int)(code >> 2) ? regs[r] >> 16 : 0u);
        uint2 packed;
        packed.x = out[0] | (out[1] << 16);
        packed.y = out[2] | (out[3] << 16);
        *reinterpret_cast<uint2*>(dense + row * stride + (size_t)kt * 32 + 4 * group) = packed;
    }
}

extern "C" __global__ void __launch_bounds__(256) sparse24_expand_tiles(const uint4* values, const unsigned* meta,
                                                                        unsigned short* dense, int tiles, int k_tiles) {
    sparse24_expand(values, meta, dense, tiles, k_tiles);
}

#define DECODE(NAME, T, NT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * SPARSE24_DECODE_WARPS)                                   \
        NAME(const uint4* values, const unsigned* meta, const T* x, T* y, int rows, int k_tiles, int stride,    \
             int batch) {                                                                                        \
        sparse24_decode<T, NT, SPARSE24_DECODE_WARPS, SPARSE24_DECODE_STEPS>(values, meta, x, y, rows, k_tiles, \
                                                                            stride, batch);                     \
    }
#define GEMM(NAME, T)                                                                                              \
    extern "C" __global__ void __launch_bounds__(256) NAME(const uint4* values, const unsigned* meta, const T* x, \
                                                            T* y, int rows, int m_tiles, int k_tiles, int stride,  \
                                                            int tokens) {                                           \
        sparse24_gemm<T>(values, meta, x, y, rows, m_tiles, k_tiles, stride, tokens);                             \
    }

DECODE(sparse24_decode_f16_n1, __half, 1)
DECODE(sparse24_decode_f16_n2, __half, 2)
DECODE(sparse24_decode_bf16_n1, __nv_bfloat16, 1)
DECODE(sparse24_decode_bf16_n2, __nv_bfloat16, 2)
GEMM(sparse24_gemm_f16, __half)
GEMM(sparse24_gemm_bf16, __nv_bfloat16)
