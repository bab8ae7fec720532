"""exo-stable: distributed LLM inference on MLX that answers token for token like one device."""

import os

__version__ = "0.1.0"

# MLX's CUDA backend hands attention to cuDNN where it can, and cuDNN's attention is not bit-repeatable: on
# an H200 the same greedy request decoded twice diverged within 10 tokens (benchmarks/bench_gpu.py). With
# MLX's own attention kernels every run, and every split, is bit-identical. MLX reads this once, at the
# first attention call; a user who prefers cuDNN's speed over repeatability can set it to 1.
os.environ.setdefault("MLX_CUDA_USE_CUDNN_SDPA", "0")
