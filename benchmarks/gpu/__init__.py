"""GPU benchmarks of the CUDA kernels, run on a machine with an NVIDIA GPU.

``python -m benchmarks.gpu [STEP]`` (or ``bash benchmarks/gpu/run.sh [STEP]``) runs one GPU
session: the CUDA tests and the benchmarks below, each writing its tables under ``$OUT``.
How the numbers are measured, and how to set up the GPU machine: ``docs/gpu.md``. Each
script also runs alone, ``python3 -m benchmarks.gpu.<name> --out DIR``:

- :mod:`~benchmarks.gpu.bench`: quantize, scores and WHT from 2^10 to 2^22 vectors against
  cupy/torch baselines, and host overhead per call;
- :mod:`~benchmarks.gpu.kv_bench`: decode attention over compressed K and V against torch
  fp16 SDPA;
- :mod:`~benchmarks.gpu.attend_breakdown`: where the time of ``KVCache.attend`` and of a
  decode step goes;
- :mod:`~benchmarks.gpu.shapes`: the kernels at other head dims and bit widths;
- :mod:`~benchmarks.gpu.score_tables`: the one-query score kernel's table plans;
- :mod:`~benchmarks.gpu.attention_variants`: the decode-attention kernel's configurations;
- :mod:`~benchmarks.gpu.overhead`: host time of a call and its pieces;
- :mod:`~benchmarks.gpu.attention_once`: one attention launch, for a profiler.

``python -m benchmarks.tools.gpu_results`` merges the tables into the results files.
"""
