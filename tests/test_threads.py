"""Shared quantizers used from several Python threads at once, under each Numba threading
layer (``workqueue`` aborts the process on overlapping parallel launches unless rotorq
serializes them: :mod:`rotorq.cpu._threads`)."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import rotorq

# Runs in a fresh process (the threading layer is chosen once per process). Quantizes and
# scores with shared quantizers on one thread, then on THREADS threads at once, and checks
# that every concurrent result equals the single-thread one bit for bit.
SCRIPT = r"""
import sys, threading
import numba, numpy as np, rotorq

seed, threads, rounds = (int(a) for a in sys.argv[1:4])
try:
    numba.get_num_threads()
except ValueError as exc:  # the requested layer is not installed here
    print("unavailable:", str(exc).splitlines()[0])
    sys.exit(0)
rng = np.random.default_rng(seed)
x = rng.standard_normal((2048, 96)).astype(np.float32)
q = rng.standard_normal((3, 96)).astype(np.float32)
quantizers = [rotorq.TurboQuant(96, 3, mode="prod", seed=seed),
              rotorq.TurboQuant(96, 2, rotation="rotor", seed=seed + 1),
              rotorq.TurboQuant(96, 4, rotation="dense", seed=seed + 2),
              rotorq.QJL(96, 128, seed=seed + 3)]

def run(qz):
    codes = qz.quantize(x)
    out = [codes.codes if hasattr(codes, "codes") else codes.qjl_signs, qz.scores(q, codes)]
    if hasattr(qz, "dequantize"):
        out.append(qz.dequantize(codes))
    return out

expected = [run(qz) for qz in quantizers]
start = threading.Barrier(threads)
failures = []

def work():
    start.wait()
    for _ in range(rounds):
        for qz, want in zip(quantizers, expected):
            got = run(qz)
            if not all(np.array_equal(g, w) for g, w in zip(got, want)):
                failures.append(repr(qz))

pool = [threading.Thread(target=work) for _ in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
print("layer", numba.threading_layer(), "threads", numba.get_num_threads())
print("failures", len(failures), sorted(set(failures)))
sys.exit(1 if failures else 0)
"""


def run_script(layer, seed, threads=4, rounds=4):
    env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
    env.setdefault("NUMBA_NUM_THREADS", "2")  # parallel regions even on a one-core runner
    return subprocess.run([sys.executable, "-c", SCRIPT, str(seed), str(threads), str(rounds)],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_concurrent_calls_on_shared_quantizers(rng, layer):
    res = run_script(layer, int(rng.integers(1 << 30)))
    out = res.stdout + res.stderr
    if res.returncode == 0 and res.stdout.startswith("unavailable"):
        pytest.skip(f"Numba's {layer} threading layer is not installed: {res.stdout.strip()}")
    # workqueue without the lock: "Numba workqueue threading layer is terminating:
    # Concurrent access has been detected", SIGABRT (returncode -6).
    assert res.returncode == 0, out
    assert f"layer {layer}" in res.stdout, out
    assert "failures 0" in res.stdout, out


def test_concurrent_calls_in_process(rng):
    """The layer this test process got (whichever it is): threads give the serial results."""
    seed = int(rng.integers(1 << 30))
    x = rng.standard_normal((1500, 64)).astype(np.float32)
    q = rng.standard_normal((2, 64)).astype(np.float32)
    tq = rotorq.TurboQuant(64, 3, mode="prod", seed=seed)
    want_codes = tq.quantize(x)
    want = tq.scores(q, want_codes)
    failures = []
    start = threading.Barrier(3)

    def work():
        start.wait()
        for _ in range(3):
            codes = tq.quantize(x)
            if not (np.array_equal(codes.codes, want_codes.codes)
                    and np.array_equal(tq.scores(q, codes), want)):
                failures.append(1)

    pool = [threading.Thread(target=work) for _ in range(3)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not failures


def test_guard_locks_only_under_workqueue():
    import numba

    from rotorq.cpu import _threads

    guard = _threads.guard()
    assert (guard is _threads._LOCK) == (numba.threading_layer() == "workqueue")
    with guard, guard:  # reentrant: an entry point may call another
        pass
