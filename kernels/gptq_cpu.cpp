// GPTQ's column loop on a CPU (solvers/sparsegpt.py calls it; quant.py's round_to_grid is the reference).
//
// The weight is kept transposed, WT [in, out]: input column i of the weight is row i, contiguous. Within a block
// of columns, column i is rounded to its grid, its error e = (w - q) / d_i is kept, and every later column k of
// the same stretch gets w_k -= U[i, k] * e. Rows of W (the outputs, WT's second dimension) never meet in this
// loop: each thread takes a slice of them and runs every column of the stretch on its own, where torch ran about
// seven operators a column, each a pass over all rows (and a Python call). The rounding is quant.round_to_grid's,
// operation for operation in fp32: q = (clamp(round(w / s) + z, qmin, qmax) - z) * s, round half to even, the
// zero point skipped when symmetric; a position with keep 0 rounds to 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "cpu_common.h"

#include <cmath>
#include <cstdint>

namespace {

// One task's rows [r0, r1) through columns [start, stop). Cloned for x86-64-v4 (AVX-512), v3 (AVX2 + FMA) and
// the baseline, the clone chosen when the module loads by what the CPU reports: the build assumes nothing.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void columns_rows(float* w, float* q, float* err, const float* u, const float* invd, const float* sc,
                  const float* zp, const int64_t* grp, const float* kp, int64_t ws, int64_t qs, int64_t es,
                  int64_t ks, int64_t us, int64_t n, int64_t start, int64_t stop, int64_t reach, float qmin,
                  float qmax, bool symmetric, int64_t r0, int64_t r1) {
  for (int64_t i = start; i < stop; ++i) {
    const float* s = sc + grp[i] * n;
    const float* z = zp + grp[i] * n;
    float* wi = w + i * ws;
    float* qi = q + i * qs;
    float* ei = err + i * es;
    const float di = invd[i];
    if (symmetric) {
      for (int64_t r = r0; r < r1; ++r) {
        float v = std::nearbyint(wi[r] / s[r]);
        v = v < qmin ? qmin : (v > qmax ? qmax : v);
        qi[r] = v * s[r];
      }
    } else {
      for (int64_t r = r0; r < r1; ++r) {
        float v = std::nearbyint(wi[r] / s[r]) + z[r];
        v = v < qmin ? qmin : (v > qmax ? qmax : v);
        qi[r] = (v - z[r]) * s[r];
      }
    }
    if (kp != nullptr) {
      const float* ki = kp + i * ks;
      for (int64_t r = r0; r < r1; ++r) qi[r] *= ki[r];
    }
    for (int64_t r = r0; r < r1; ++r) ei[r] = (wi[r] - qi[r]) * di;
    for (int64_t k = i + 1; k < reach; ++k) {
      const float c = u[i * us + k];
      float* wk = w + k * ws;
      for (int64_t r = r0; r < r1; ++r) wk[r] -= c * ei[r];
    }
  }
}

// Columns [start, stop) of the stretch that W1's rows hold, updates reaching rows up to `reach` (exclusive).
// W1, Q1, Err1: [b, n] fp32 with contiguous rows; U1 [b, b] fp32 contiguous (upper); inv_d [b]; scale, zero
// [groups, n] with column i on the grid of row group[i]; keep [b, n] (1 kept, 0 pruned) or an empty tensor.
void gptq_columns(torch::Tensor W1, torch::Tensor U1, torch::Tensor Q1, torch::Tensor Err1, torch::Tensor inv_d,
                  torch::Tensor scale, torch::Tensor zero, torch::Tensor group, torch::Tensor keep, int64_t start,
                  int64_t stop, int64_t reach, double qmin_d, double qmax_d, bool symmetric) {
  TORCH_CHECK(W1.dtype() == torch::kFloat32 && Q1.dtype() == torch::kFloat32 && Err1.dtype() == torch::kFloat32,
              "gptq_columns: fp32 weights only");
  TORCH_CHECK(W1.dim() == 2 && W1.stride(1) == 1 && Q1.stride(1) == 1 && Err1.stride(1) == 1,
              "gptq_columns: rows must be contiguous");
  TORCH_CHECK(U1.is_contiguous() && inv_d.is_contiguous() && scale.is_contiguous() && zero.is_contiguous() &&
                  group.is_contiguous() && group.dtype() == torch::kInt64,
              "gptq_columns: U1, inv_d, scale, zero and group must be contiguous (group int64)");
  const int64_t b = W1.size(0), n = W1.size(1);
  TORCH_CHECK(0 <= start && start <= stop && stop <= reach && reach <= b, "gptq_columns: bad column range");
  TORCH_CHECK(U1.size(0) >= b && U1.size(1) == U1.size(0) && scale.size(1) == n && zero.size(1) == n,
              "gptq_columns: shapes do not match");
  const bool masked = keep.numel() > 0;
  TORCH_CHECK(!masked || (keep.dtype() == torch::kFloat32 && keep.stride(1) == 1 && keep.size(1) == n),
              "gptq_columns: keep must be fp32 [b, n] with contiguous rows");
  float* w = W1.data_ptr<float>();
  float* q = Q1.data_ptr<float>();
  float* err = Err1.data_ptr<float>();
  const float* u = U1.data_ptr<float>();
  const float* invd = inv_d.data_ptr<float>();
  const float* sc = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  const int64_t* grp = group.data_ptr<int64_t>();
  const float* kp = masked ? keep.data_ptr<float>() : nullptr;
  const int64_t ws = W1.stride(0), qs = Q1.stride(0), es = Err1.stride(0), ks = masked ? keep.stride(0) : 0;
  const int64_t us = U1.size(1);
  const float qmin = float(qmin_d), qmax = float(qmax_d);
  // 256 rows (1 KiB of each column) a task: a stretch of 32 columns then lives in L1/L2 of its thread
  // 256 rows (1 KiB of each column) a task: a stretch of 32 columns then lives in L1/L2 of its thread
  at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {
    columns_rows(w, q, err, u, invd, sc, zp, grp, kp, ws, qs, es, ks, us, n, start, stop, reach, qmin, qmax,
                 symmetric, r0, r1);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gptq_columns", &gptq_columns, "GPTQ's rounding and in-stretch error feedback over columns [start, stop)");
  m.def("threaded", &llmprune_common::threaded, "whether the module was built with OpenMP");
}
