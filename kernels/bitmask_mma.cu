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

// Decode launch shape: warps per block (the host launches 32 x this many threads), tiles per group, and the
// blocks per multiprocessor the register budget aims at. Defaults measured on an H200 (eval/tune_decode.py).
#ifndef BITMASK_DECODE_WARPS
#define BITMASK_DECODE_WARPS 8
#endif
#ifndef BITMASK_DECODE_STEPS
#define BITMASK_DECODE_STEPS 4
#endif
#ifndef BITMASK_DECODE_MIN_BLOCKS
#define BITMASK_DECODE_MIN_BLOCKS 3
#endif

// A tile's bytes as a warp reads them: lane l holds 16-byte chunks l and l + 32 of the tile's values.
struct RawTile {
    unsigned mask;  // this lane's 16 kept-bits
    int chunks;     // the tile's 16-byte chunks of values
    uint4 v0, v1;
};

__device__ __forceinline__ void load_values(RawTile& raw, const uint4* __restrict__ values, int first, int lane) {
    raw.v0 = lane < raw.chunks ? __ldcs(values + first + lane) : make_uint4(0, 0, 0, 0);
    raw.v1 = lane + 32 < raw.chunks ? __ldcs(values + first + lane + 32) : make_uint4(0, 0, 0, 0);
}

// Expand a loaded tile into this lane's operand-A registers (a[0..3]: inputs 0..15, a[4..7]: 16..31) through
// `stage`, this warp's 1 KB of shared memory: the lane's values start after the kept weights of lanes below it.
__device__ __forceinline__ void expand_raw(unsigned (&a)[8], const RawTile& raw, uint4* stage, int lane) {
    if (lane < raw.chunks) stage[lane] = raw.v0;
    if (lane + 32 < raw.chunks) stage[lane + 32] = raw.v1;
    const int count = __popc(raw.mask);
    int before = count;  // inclusive prefix sum over the lanes
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const int up = __shfl_up_sync(0xffffffffu, before, d);
        if (lane >= d) before += up;
    }
    __syncwarp();
    const unsigned short* mine = reinterpret_cast<const unsigned short*>(stage) + (before - count);
#pragma unroll
    for (int r = 0; r < 8; ++r) {  // each value's place among the lane's kept ones: independent loads
        const unsigned lo = (raw.mask >> (2 * r)) & 1u, hi = (raw.mask >> (2 * r + 1)) & 1u;
        const int at = __popc(raw.mask & ((1u << (2 * r)) - 1u));
        const unsigned v0 = lo ? mine[at] : 0u;
        const unsigned v1 = hi ? mine[at + lo] : 0u;
        a[r] = v0 | (v1 << 16);
    }
    __syncwarp();
}

// Decode: one block per 16-row tile; warp w takes a contiguous run of the row's tiles, U at a time, with the
// next U tiles' offsets and masks loaded while this group's values arrive (one memory round trip per group).
template <typename T, int NT, int WARPS, int U>
__device__ void bitmask_decode(const uint4* __restrict__ values, const int* __restrict__ offsets,
                               const unsigned short* __restrict__ masks, const T* __restrict__ x, T* __restrict__ y,
                               int rows, int k_tiles, int stride, int batch) {
    __shared__ float partial[WARPS][NT][4][32];
    __shared__ uint4 stages[WARPS][U][64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int mt = blockIdx.x;
    const int per_warp = (k_tiles + WARPS - 1) / WARPS;
    const int begin = min(warp * per_warp, k_tiles), end = min(begin + per_warp, k_tiles);
    const size_t base = (size_t)mt * k_tiles;
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

    // lane u <= U holds offsets[tile kt0 + u]; mask[u] is this lane's mask of tile kt0 + u
    auto load_meta = [&](int kt0, int& offset, unsigned (&mask)[U]) {
        offset = lane <= U && kt0 + lane <= end ? offsets[base + kt0 + lane] : 0;
#pragma unroll
        for (int u = 0; u < U; ++u) mask[u] = kt0 + u < end ? masks[(base + kt0 + u) * 32 + lane] : 0u;
    };
    int offset, next_offset;
    unsigned mask[U], next_mask[U];
    load_meta(begin, offset, mask);
    for (int kt0 = begin; kt0 < end; kt0 += U) {
        RawTile raw[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int first = __shfl_sync(0xffffffffu, offset, u);
            const int last = __shfl_sync(0xffffffffu, offset, u + 1);
            raw[u].mask = mask[u];
            raw[u].chunks = kt0 + u < end ? last - first : 0;
            load_values(raw[u], values, first, lane);
        }
        load_meta(kt0 + U, next_offset, next_mask);
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (kt0 + u < end) {
                unsigned b[NT][4], a[8];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) load_tokens<T>(b[nt], x_row[nt], x_ok[nt], (kt0 + u) * 32, t, stride);
                expand_raw(a, raw[u], stages[warp][u], lane);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    mma_16816<T>(acc[nt], a[0], a[1], a[2], a[3], b[nt][0], b[nt][1]);
                    mma_16816<T>(acc[nt], a[4], a[5], a[6], a[7], b[nt][2], b[nt][3]);
                }
            }
        offset = next_offset;
#pragma unroll
        for (int u = 0; u < U; ++u) mask[u] = next_mask[u];
    }
    reduce_and_store<T, NT, WARPS>(acc, partial, y, rows, batch, mt, warp, lane);
}

// Prefill: the GEMM skeleton of mma.cuh; each warp expands its two 16-row tiles per step, with the next step's
// values and the step after's offsets and masks already on their way.
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

    int first[2], chunks[2];
    unsigned mask[2];
    auto load_meta = [&](int kt) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            const bool ok = mt0 + mi < m_tiles && kt < k_tiles;
            const size_t tile = (size_t)(mt0 + mi) * k_tiles + kt;
            first[mi] = ok ? offsets[tile] : 0;
            chunks[mi] = ok ? offsets[tile + 1] - first[mi] : 0;
            mask[mi] = ok ? masks[tile * 32 + lane] : 0u;
        }
    };
    RawTile raw[2], next[2];
    auto load_next = [&]() {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            next[mi].mask = mask[mi];
            next[mi].chunks = chunks[mi];
            load_values(next[mi], values, first[mi], lane);
        }
    };
    load_meta(0);
    load_next();
    load_meta(1);

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage<T>(stages[s], x, tokens, stride, n0, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) raw[mi] = next[mi];
        load_next();       // values of step kt + 1
        load_meta(kt + 2);  // offsets and masks of step kt + 2
        unsigned a[2][8];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
            if (mt0 + mi < m_tiles) expand_raw(a[mi], raw[mi], expand[warp], lane);
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int stage_next = kt + STAGES - 1;
        if (stage_next < k_tiles) load_stage<T>(stages[stage_next % STAGES], x, tokens, stride, n0, stage_next);
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

// The dense weight [m_tiles * 16, k_tiles * 32] of the tiles, one warp per tile: for prefill through cuBLAS.
extern "C" __global__ void __launch_bounds__(256) bitmask_expand_tiles(const uint4* values, const int* offsets,
                                                                       const unsigned short* masks,
                                                                       unsigned short* dense, int tiles, int k_tiles) {
    __shared__ uint4 stage[8][64];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = blockIdx.x * 8 + warp;
    if (tile >= tiles) return;
    const int g = lane >> 2, t = lane & 3, mt = tile / k_tiles, kt = tile % k_tiles;
    RawTile raw;
    raw.mask = masks[(size_t)tile * 32 + lane];
    raw.chunks = offsets[tile + 1] - offsets[tile];
    load_values(raw, values, offsets[tile], lane);
    unsigned a[8];
    expand_raw(a, raw, stage[warp], lane);
    const size_t stride = (size_t)k_tiles * 32;
#pragma unroll
    for (int r = 0; r < 8; ++r) {  // register r: row g + 8 (r % 2), inputs 16 (r / 4) + 8 ((r / 2) % 2) + 2t, + 1
        const int row = 16 * mt + g + 8 * (r & 1), col = 32 * kt + 16 * (r >> 2) + 8 * ((r >> 1) & 1) + 2 * t;
        *reinterpret_cast<unsigned*>(dense + row * stride + col) = a[r];
    }
}

#define DECODE(NAME, T, NT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(32 * BITMASK_DECODE_WARPS, BITMASK_DECODE_MIN_BLOCKS)               \
        NAME(const uint4* values, const int* offsets, const unsigned short* masks, const T* x, T* y, int rows,         \
             int k_tiles, int stride, int batch) {                                                                     \
        bitmask_decode<T, NT, BITMASK_DECODE_WARPS, BITMASK_DECODE_STEPS>(values, offsets, masks, x, y, rows, k_tiles, \
                                                                          stride, batch);                              \
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
