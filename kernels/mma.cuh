// Tensor-core building blocks shared by the 2:4 and bitmask kernels (sm_80 and newer): warp-level mma and
// mma.sp wrappers, ldmatrix, cp.async, and the loading of the dense operand (the tokens) in fragment order.
//
// Fragment conventions (PTX ISA, "Matrix fragments for mma.m16n8k16" and "for sparse mma.m16n8k32"):
// lane = 4 * g + t (g = groupID, t = threadID_in_group). The 16-row weight tile is operand A (row major), the
// tokens are operand B (K x 8, "col": a token's inputs are contiguous), the result is 16 rows x 8 tokens:
// d[0], d[1] are row g, tokens 2t and 2t + 1; d[2], d[3] the same tokens of row g + 8.
#pragma once
#include "common.cuh"

// D += A * B with A 16x32 2:4-sparse (4 registers of compressed values), B 32x8 (4 registers), metadata e
// from lanes t = 0, 1 of each group of four (sparsity selector 0).
template <typename T> __device__ __forceinline__ void mma_sp_16832(float (&d)[4], const uint4& a, const unsigned (&b)[4], unsigned e);
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                                                unsigned b0, unsigned b1);

#define LLMPRUNE_MMA_SP(T, PTXTYPE)                                                                                        \
    template <> __device__ __forceinline__ void mma_sp_16832<T>(float (&d)[4], const uint4& a, const unsigned (&b)[4],    \
                                                                unsigned e) {                                             \
        asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32." PTXTYPE "." PTXTYPE ".f32 "                              \
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"              \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                     \
                     : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));      \
    }
#define LLMPRUNE_MMA(T, PTXTYPE)                                                                                           \
    template <> __device__ __forceinline__ void mma_16816<T>(float (&d)[4], unsigned a0, unsigned a1, unsigned a2,        \
                                                             unsigned a3, unsigned b0, unsigned b1) {                     \
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTXTYPE "." PTXTYPE ".f32 "                                 \
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"                                   \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                     \
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));                                             \
    }
LLMPRUNE_MMA_SP(__half, "f16")
LLMPRUNE_MMA_SP(__nv_bfloat16, "bf16")
LLMPRUNE_MMA(__half, "f16")
LLMPRUNE_MMA(__nv_bfloat16, "bf16")

__device__ __forceinline__ unsigned smem_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// Four 8x8 16-bit matrices from shared memory; lanes 8i .. 8i + 7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row)));
}

// 16 bytes global -> shared, asynchronously; the bytes past src_bytes (0..16) are written as zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Operand B of one 32-input step for token n straight from global memory (decode): registers q = 0..3 hold
// inputs k0 + 8q + 2t, + 1. x rows have `stride` elements (even); inputs at or past `stride` read as zero.
template <typename T>
__device__ __forceinline__ void load_tokens(unsigned (&b)[4], const T* __restrict__ x_row, bool valid, int k0, int t,
                                            int stride) {
    const unsigned* row = reinterpret_cast<const unsigned*>(x_row);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int k = k0 + 8 * q + 2 * t;
        b[q] = valid && k < stride ? __ldg(row + (k >> 1)) : 0u;
    }
}

// Decode epilogue: the warps of a block each hold partial sums over their share of the inputs; sum them in
// shared memory and write y[token, row] for the 16 rows of tile `mt`.
template <typename T, int NT, int WARPS>
__device__ __forceinline__ void reduce_and_store(float (&acc)[NT][4], float (*partial)[NT][4][32], T* __restrict__ y,
                                                 int rows, int batch, int mt, int warp, int lane) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp][nt][i][lane] = acc[nt][i];
    __syncthreads();
    if (warp != 0) return;
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float s = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) s += partial[w][nt][i][lane];
            const int row = 16 * mt + g + 8 * (i >> 1);
            const int token = 8 * nt + 2 * t + (i & 1);
            if (row < rows && token < batch) y[(size_t)token * rows + row] = from_float<T>(s);
        }
}

// ---- prefill GEMM skeleton ------------------------------------------------------------------------------------
// Block tile: 128 weight rows x 128 tokens, 32 inputs per step, 8 warps as 4 (rows) x 2 (tokens); each warp
// owns 32 rows (two 16-row tiles) x 64 tokens (eight 8-token tiles). The tokens' 128 x 32 slice of x goes to
// shared memory by cp.async, three steps deep; each row of it is 64 bytes, four 16-byte chunks, the chunk
// index XOR-ed with (row / 2) % 4 so that ldmatrix's eight rows fall in different banks.
namespace gemm {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3, WARPS = 8, THREADS = 32 * WARPS;
using Stage = unsigned short[BN][BK];

__device__ __forceinline__ int swizzle(int n, int chunk) { return chunk ^ ((n >> 1) & 3); }

// x: [tokens, stride] with stride % 8 == 0 and 16-byte aligned rows (the host sees to both).
template <typename T>
__device__ __forceinline__ void load_stage(Stage& s, const T* __restrict__ x, int tokens, int stride, int n0, int kt) {
    for (int i = threadIdx.x; i < BN * 4; i += THREADS) {
        const int n = i >> 2, chunk = i & 3;
        const int token = n0 + n, k = kt * BK + chunk * 8;
        int bytes = token < tokens ? 2 * (stride - k) : 0;
        bytes = bytes < 0 ? 0 : (bytes > 16 ? 16 : bytes);
        const T* src = bytes ? x + (size_t)token * stride + k : x;
        cp_async_16(&s[n][swizzle(n, chunk) * 8], src, bytes);
    }
}

// Operand B (32 inputs x 8 tokens) of token tile j of this warp, from a stage.
__device__ __forceinline__ void stage_fragment(unsigned (&b)[4], const Stage& s, int n_base, int lane) {
    const int n = n_base + (lane & 7), chunk = lane >> 3;
    ldmatrix_x4(b, &s[n][swizzle(n, chunk) * 8]);
}

template <typename T>
__device__ __forceinline__ void store_tile(float (&acc)[2][8][4], T* __restrict__ y, int rows, int tokens, int row0,
                                           int token0, int lane) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = row0 + 16 * mi + g + 8 * (i >> 1);
                const int token = token0 + 8 * j + 2 * t + (i & 1);
                if (row < rows && token < tokens) y[(size_t)token * rows + row] = from_float<T>(acc[mi][j][i]);
            }
}
}  // namespace gemm
