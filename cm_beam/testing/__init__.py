"""Pools for demos, tests and benchmarks: the demo image pool and model (`demo_pool`)
and synthetic score/cluster tables (`synthetic_pool`).
"""
