"""grape_kernels: execute ragged Mixture-of-Experts layers fast (Triton, CUDA, CPU)."""
