"""Pools for demos, tests and benchmarks: the demo image pool and model (`demo_pool`)
and synthetic score/cluster tables (`synthetic_pool`), and the sequential references
the tests compare the distributed kernels with (`reference_kernels`).
"""
