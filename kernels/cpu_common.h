// What the CPU kernels (bitmask_cpu.cpp, gptq_cpu.cpp) share.
#pragma once

namespace llmprune_common {
// Whether the module was built with OpenMP: at::parallel_for runs on torch's thread pool only then.
inline bool threaded() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}
}  // namespace llmprune_common
