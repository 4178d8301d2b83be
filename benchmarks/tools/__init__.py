"""Tools around the benchmarks: shared report helpers, results merging, kernel inspection.

``python -m benchmarks.tools`` lists them; ``python -m benchmarks.tools NAME [ARGS]`` runs one
(the same as ``python -m benchmarks.tools.NAME [ARGS]``):

- :mod:`~benchmarks.tools.report`: progress lines, timing, markdown tables and the sections
  of the results files (a library for the other scripts, not a command);
- :mod:`~benchmarks.tools.gpu_results`: merge the GPU runs' tables into the results files;
- :mod:`~benchmarks.tools.sass_count`: count a generated kernel's SASS instructions without
  a GPU;
- :mod:`~benchmarks.tools.launch_bounds`: quantize time against resident blocks per SM (GPU);
- :mod:`~benchmarks.tools.make_fixture`: rebuild ``tests/data/smollm2_kv.npz``.
"""
