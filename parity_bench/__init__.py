"""Benchmarks, programs rather than tests: the forward and decoding against the machine's GEMM and
memory-bandwidth references, and the peak memory of loading a checkpoint."""
