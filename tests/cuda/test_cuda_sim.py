"""Every CUDA kernel under Numba's simulator against its CPU twin, on tiny random inputs.

Run in a separate process: ``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/cuda``.
Outputs are poisoned before each launch, so an element a kernel forgets to write fails.
Launches use small blocks (4 lanes × 2 rows, 4 key threads, 2 query rows per block, 2
blocks striding over 3 output batches) so that rows, tiles, batches and query chunks all
have partial last blocks.
"""

import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("simulator tests: run with NUMBA_ENABLE_CUDASIM=1 -m cudasim",
                allow_module_level=True)

from _cuda_cases import kernel_cases, poisoned

from rotorq.cuda._threads import row_scratch_bytes

pytestmark = pytest.mark.cudasim

LANES, ROWS, KEY_THREADS, CHUNK, BATCH_BLOCKS = 4, 2, 4, 2, 2


def launch(case, args):
    """Launch ``case``'s kernel on ``args`` with the small simulator geometry."""
    kern = case.get_kernel()
    if case.geometry[0] == "rows":
        _, n, width = case.geometry
        grid, block = (-(-n // ROWS), 1), (LANES, ROWS)
        shared = row_scratch_bytes(LANES, ROWS, width)
    else:
        _, per_query, levels = case.geometry
        n_b, n_m, n_keys = args[case.outputs[0]].shape
        grid = (-(-n_keys // KEY_THREADS), min(n_b, BATCH_BLOCKS), -(-n_m // CHUNK))
        block, shared = (KEY_THREADS, 1), 4 * (CHUNK * per_query + levels)
    kern[grid, block, 0, shared](*args)


@pytest.mark.parametrize("case", kernel_cases(seed=np.random.SeedSequence().entropy % 2**32),
                         ids=lambda c: c.name)
def test_kernel_matches_cpu_twin(case):
    args = list(case.args)
    for i in case.outputs:
        args[i] = poisoned(args[i])
    launch(case, args)
    for i, expected in zip(case.outputs, case.expected, strict=True):
        got = args[i]
        if got.dtype.kind == "u":
            np.testing.assert_array_equal(got, expected, err_msg=f"output {i}")
        else:
            np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6, err_msg=f"output {i}")
