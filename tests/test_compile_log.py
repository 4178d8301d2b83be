"""First-call compiles: every CPU kernel is cached on disk, and compiles are logged on "rotorq"."""

import importlib
import logging
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest
import scipy.linalg

import rotorq
from rotorq._log import compile_seconds

ROOT = Path(rotorq.__file__).parent


def exact_wht(x):
    n = x.shape[-1]
    return x.astype(np.float64) @ scipy.linalg.hadamard(n).T / np.sqrt(n)


def _cpu_modules():
    for info in pkgutil.walk_packages(rotorq.__path__, "rotorq."):
        if not info.name.startswith("rotorq.cuda"):  # CUDA kernels: numba.cuda, PTX cache
            yield importlib.import_module(info.name)


def test_every_cpu_kernel_uses_numbas_disk_cache():
    kernels = {}
    for module in _cpu_modules():
        for name, obj in vars(module).items():
            if isinstance(obj, numba.core.dispatcher.Dispatcher):
                kernels[f"{obj.py_func.__module__}.{name}"] = obj
    assert len(kernels) >= 40, sorted(kernels)
    uncached = [name for name, kernel in kernels.items() if type(kernel._cache).__name__ == "NullCache"]
    assert uncached == []


def test_kernels_are_made_only_by_the_shared_decorators():
    """``rotorq/cpu/_jit.py`` is the one place that calls ``numba.njit`` (with ``cache=True``)."""
    makers = ("njit(", "numba.jit(", "@jit(", "generated_jit")
    offenders = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")
                 if path.parts[len(ROOT.parts)] != "cuda" and path.name != "_jit.py"
                 and any(m in path.read_text() for m in makers)]
    assert offenders == []


def test_a_compile_is_logged_on_the_rotorq_logger(caplog, rng):
    from rotorq.cpu.wht import fwht_row

    fresh = numba.njit(fwht_row.py_func)  # a new dispatcher without a disk cache: it compiles
    row = rng.standard_normal(64).astype(np.float32)
    before = compile_seconds()
    got = row.copy()
    with caplog.at_level(logging.INFO, logger="rotorq"):
        fresh(got)
    np.testing.assert_allclose(got, exact_wht(row), rtol=1e-5, atol=1e-5)
    records = [r for r in caplog.records if r.name == "rotorq"]
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert records[0].getMessage().startswith(
        "compiled rotorq.cpu.wht.fwht_row for (array(float32, 1d, C)) in ")
    assert compile_seconds() > before


def test_compiles_of_other_code_are_not_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="rotorq"):
        assert numba.njit(lambda x: x + 1)(41) == 42
    assert [r for r in caplog.records if r.name == "rotorq"] == []


def test_the_library_prints_nothing_and_a_later_process_loads_from_disk(tmp_path):
    """With a fresh ``NUMBA_CACHE_DIR`` the first process compiles (and logs it at INFO), the
    second loads every kernel from disk (no compile record) and gets the same result; neither
    writes anything to stdout or stderr without a logging configuration."""
    script = textwrap.dedent("""
        import logging, sys
        import numpy as np, rotorq
        if sys.argv[1] == "log":
            logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
            logging.getLogger("rotorq").setLevel(logging.INFO)
        x = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)
        np.save(sys.argv[2], rotorq.wht(x))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))

    def run(mode, out):
        return subprocess.run([sys.executable, "-c", script, mode, str(tmp_path / out)], env=env,
                              capture_output=True, text=True, timeout=600)

    first = run("log", "first.npy")
    assert first.returncode == 0, first.stderr
    assert "rotorq INFO compiled rotorq.cpu.wht.wht for (array(float32, 2d, C)" in first.stderr
    second = run("log", "second.npy")
    assert second.returncode == 0, second.stderr
    assert "compiled" not in second.stderr
    quiet = run("quiet", "third.npy")
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "", "")
    x = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)
    for out in ("first.npy", "second.npy", "third.npy"):
        np.testing.assert_allclose(np.load(tmp_path / out), exact_wht(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_a_kernel_compiled_inside_another_logs_at_debug(caplog, level):
    namespace = {"__name__": "rotorq._nested_compile_test"}
    exec("def inner(x):\n    return x + 1\n", namespace)
    namespace["inner"] = numba.njit(namespace["inner"])
    exec("def outer(x):\n    return 2 * inner(x)\n", namespace)
    outer = numba.njit(namespace["outer"])
    with caplog.at_level(level, logger="rotorq"):
        assert outer(3) == 8
    got = [(r.levelno, r.getMessage().split(" for ")[0]) for r in caplog.records if r.name == "rotorq"]
    want = [(logging.INFO, "compiled rotorq._nested_compile_test.outer")]
    if level == logging.DEBUG:
        want.insert(0, (logging.DEBUG, "compiled rotorq._nested_compile_test.inner"))
    assert got == want
