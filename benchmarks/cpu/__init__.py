"""CPU benchmarks: quality of the compression on real data and CPU speed.

``python -m benchmarks.cpu`` runs the suite (:mod:`benchmarks.cpu.suite`: real-KV fidelity,
perplexity, nearest-neighbour recall against FAISS, speed, MSE per bit width; ``--quick``
for a short run). The other studies run on their own, each with ``python -m
benchmarks.cpu.<name>``:

- :mod:`~benchmarks.cpu.fidelity_levers`: which KV-cache lever bought what (SmolLM2-135M);
- :mod:`~benchmarks.cpu.kvcache_perplexity`: SmolLM2-135M decoded through ``rotorq.KVCache``;
- :mod:`~benchmarks.cpu.attend_speed`, :mod:`~benchmarks.cpu.kv_attention`: CPU decode
  attention against numpy float32 attention;
- :mod:`~benchmarks.cpu.kv_error`: attention-output error of the cache per bit width.

:mod:`~benchmarks.cpu.smollm2` and :mod:`~benchmarks.cpu.minilm` load the models and texts
the studies use.
"""
