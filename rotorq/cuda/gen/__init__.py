"""Generated CUDA kernels: Python source written per compile-time shape, compiled by Numba.

Every generated kernel is named by a *spec*, a frozen dataclass with every knob of its
generator; :func:`build.build` turns a spec into a ``cuda.jit`` kernel once
(``functools.cache``), and ``spec.source()`` shows the generated source (:func:`build.dump`
writes sources to files). In a generated source every coordinate index, bit offset and shift
is a constant, so rows and codes live in registers and fields are constant shifts.

Modules:

* :mod:`.build` — the builder and the spec base class;
* :mod:`.intrinsics` — PTX intrinsics (inline PTX, LLVM instructions) and their simulator twins;
* :mod:`.fields` — source expressions shared by the generators (code fields, bank model);
* :mod:`.row_tiles`, :mod:`.decide` — the tiled row-kernel skeleton and the code decisions;
* :mod:`.wht`, :mod:`.quantize`, :mod:`.quantize_rotor` — tiled WHT and fused quantize;
* :mod:`.score_tiles`, :mod:`.scores_one`, :mod:`.scores_group` — tiled MSE scores (one query
  row by lookup tables; 2–8 rows on tensor cores);
* :mod:`.scores_rows` — MSE scores with one key per thread, for the shapes the tiled score
  kernels do not take;
* :mod:`.attention`, :mod:`.key_bias` — tensor-core decode attention and its RoPE-aware
  key-offset term.

Each generator module offers ``spec(...)`` (defaults resolved into a complete spec) and
``kernel(...)`` (the built kernel of that spec).
"""
