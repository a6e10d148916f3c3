"""CUDA C++ sources of llmprune's kernels, shipped as package data (llmprune._cuda) and compiled at run time."""
