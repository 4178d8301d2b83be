"""Shared helpers of the benchmark scripts: progress lines, timing, tables, results files.

The scripts write their full tables to ``benchmarks/results/cpu.md`` (:data:`CPU_TABLES`)
and ``benchmarks/results/gpu.md`` (:data:`GPU_TABLES`); ``benchmarks/RESULTS.md``
(:data:`RESULTS`) is the page that summarizes them, kept by hand. A tables file is shared by
several scripts; each owns named sections delimited by HTML comments::

    <!-- BEGIN cpu:fidelity -->
    ...
    <!-- END cpu:fidelity -->

:func:`write_sections` replaces only the sections it is given and keeps everything else
in the file, so a rerun of one script leaves the others' tables in place.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import re
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
RESULTS = BENCHMARKS / "RESULTS.md"
"""The results page: the latest number per capability (kept by hand, not written here)."""
CPU_TABLES = BENCHMARKS / "results" / "cpu.md"
"""Full tables of the CPU scripts' latest runs."""
GPU_TABLES = BENCHMARKS / "results" / "gpu.md"
"""Full tables of the GPU runs, merged by :mod:`benchmarks.tools.gpu_results`."""
PLOTS = BENCHMARKS / "plots"
"""Plots of the CPU suite, shown on the results page."""
_TITLE = "# rotorq benchmark tables\n"


class Progress:
    """Print timestamped progress lines (flushed at once, so long runs show where they are).

    Parameters
    ----------
    stream : file-like, optional
        Where to print; default ``sys.stderr``.
    """

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        """Print ``message`` prefixed with the seconds elapsed since construction."""
        elapsed = time.perf_counter() - self.start
        print(f"[{elapsed:7.1f} s] {message}", file=self.stream, flush=True)


def passive_openmp() -> str:
    """Ask OpenMP runtimes loaded from now on to sleep, not spin, while waiting for work.

    FAISS and torch bring their own libgomp, whose default busy-waiting makes fine-grained
    parallel loops (FAISS k-means) 20–100× slower when the cores are shared with other
    processes.  Has no effect on a runtime that is already loaded, so call it before
    importing faiss or torch.  An ``OMP_WAIT_POLICY`` set by the user is kept.

    Returns
    -------
    str
        The policy in force.
    """
    return os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def median_time(fn, repeats: int, warmup: int = 1, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed runs.

    Parameters
    ----------
    fn : callable
        Called without arguments.
    repeats : int
        Least number of timed runs.
    warmup : int, default 1
        Untimed runs first (JIT compilation, caches, page faults).
    min_seconds : float, default 0
        Keep timing (up to 1000 runs) until this much time was spent, so that short
        calls get many samples and scheduler hiccups do not move the median.

    Returns
    -------
    float
        Median seconds per call.
    """
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 1000):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(header, rows, align=None) -> str:
    """Format a GitHub markdown table.

    Parameters
    ----------
    header : sequence of str
        Column titles.
    rows : iterable of sequences
        Cells; each is converted with ``str``.
    align : str, optional
        One character per column, ``"l"`` or ``"r"``; default: first column left, the
        others right.

    Returns
    -------
    str
        The table, ending with a newline.
    """
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align has {len(align)} entries for {len(header)} columns")
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    return "?"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    try:
        module = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        return "not installed"
    return f"{getattr(module, '__version__', '?')} (source tree)"


def environment(packages=("rotorq", "numpy", "numba", "scipy", "torch", "faiss-cpu",
                          "matplotlib")) -> dict:
    """Machine, package versions and date, for the header of a results section.

    Parameters
    ----------
    packages : sequence of str
        Distribution names whose versions are listed.

    Returns
    -------
    dict
        ``machine``, ``cpu``, ``cores``, ``memory``, ``python``, ``versions`` (dict) and
        ``date`` (UTC, ISO 8601).
    """
    return {
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory": _memory_gib(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in packages},
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def environment_markdown(env: dict) -> str:
    """Render :func:`environment` as a short bullet list."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    return (f"- date: {env['date']}\n"
            f"- machine: {env['machine']}, {env['cpu']}, {env['cores']} cores, "
            f"{env['memory']}\n"
            f"- python {env['python']}; {versions}\n")


def _markers(key: str) -> tuple[str, str]:
    return f"<!-- BEGIN {key} -->", f"<!-- END {key} -->"


def write_sections(sections: dict[str, str], path: Path) -> Path:
    """Replace (or append) the named sections of a tables file, keeping all others.

    Parameters
    ----------
    sections : dict of str to str
        Section key (e.g. ``"cpu:fidelity"``) → markdown body.  New keys are appended
        in the given order.
    path : pathlib.Path
        The tables file, e.g. :data:`CPU_TABLES`; created (with its parent folder) if
        missing.

    Returns
    -------
    pathlib.Path
        The written file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "R.md"
    >>> _ = write_sections({"gpu:x": "gpu table\\n", "cpu:a": "old\\n"}, p)
    >>> _ = write_sections({"cpu:a": "new\\n"}, p)
    >>> text = p.read_text()
    >>> "gpu table" in text, "new" in text, "old" in text
    (True, True, False)
    """
    text = path.read_text(encoding="utf-8") if path.is_file() else _TITLE
    path.parent.mkdir(parents=True, exist_ok=True)
    for key, body in sections.items():
        begin, end = _markers(key)
        block = f"{begin}\n{body.rstrip()}\n{end}"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _, block=block: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
    return path
