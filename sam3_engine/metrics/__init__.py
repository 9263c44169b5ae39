"""Metrics of the engine's benchmarks."""
