"""Benchmarks: ``python -m benchmarks.memory`` (predicted vs measured peak memory)."""
