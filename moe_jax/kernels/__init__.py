"""Grouped-matmul implementations of the dropless experts: rows sorted by expert times that
expert's weights (`grouped_matmul`: the entry point and the XLA blocked loop), the host-BLAS
custom call on CPU (`grouped_matmul_cpu`, through `cpu_ffi`), and the TPU/GPU kernels of
megablox and tokamax (`grouped_matmul_kernels`)."""
