"""The scoring core: kernels, weights, scorers, embedding decoding, per-row outcomes. Pure: numpy and numba, no IO, no Spark."""
