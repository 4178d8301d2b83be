"""The code decisions of the generated quantize kernels (:mod:`rotorq.cuda.gen.decide`): the
generated lines run as Python against the CPU's count of boundaries, no GPU or simulator
needed."""

import importlib

import numpy as np
import pytest

import rotorq

decide = importlib.import_module("rotorq.cuda.gen.decide")


@pytest.mark.parametrize("bits", (1, 2, 3))
def test_register_decision_matches_cpu_count(bits):
    """The register bisection of the quantize kernel gives the CPU's code (the number of
    boundaries ``<= y``) for every ``y``, values exactly on a boundary, ±0 and NaN included."""
    cpu_q = importlib.import_module("rotorq.cpu.quantize")
    tq = rotorq.TurboQuant(32, bits, rotation="hadamard", norm_dtype="float32")
    bd = np.asarray(tq.boundaries, np.float32)
    src = "\n".join(["def decide(y, bd):"]
                    + [f"    bd{i} = bd[{i}]" for i in range(bd.shape[0])]
                    + ["    " + line for line in decide.register_decide("y", "c", bits)] + ["    return c"])
    env = {"U32": np.uint32}
    exec(src, env)
    ys = np.concatenate([bd, np.nextafter(bd, np.float32(-np.inf)), np.nextafter(bd, np.float32(np.inf)),
                         np.float32([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -1.0]),
                         np.random.default_rng(bits).standard_normal(200).astype(np.float32) * 0.3])
    for y in ys.astype(np.float32):
        assert env["decide"](y, bd) == cpu_q.encode_value(y, bd), y


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("codebook", ("gaussian", "beta"))
def test_symmetric_decision_matches_cpu_count(bits, codebook):
    """The sign-and-magnitude decision of fp16 rows gives the CPU's code (the number of
    boundaries ``<= y``) for every ``y`` but ``-y`` exactly on a boundary (one code lower
    there: the documented rounding flips), ±0 included; it relies on every codebook being
    symmetric about an exact 0, which this checks too."""
    cpu_q = importlib.import_module("rotorq.cpu.quantize")
    tq = rotorq.TurboQuant(32, bits, rotation="hadamard", norm_dtype="float32",
                           codebook=codebook)
    bd = np.asarray(tq.boundaries, np.float32)
    mid = bd.shape[0] // 2
    assert bd[mid] == 0 and np.array_equal(bd, -bd[::-1])
    pos = decide.register_boundaries(bits, "sym")
    assert pos == list(range(mid + 1, bd.shape[0]))
    src = "\n".join(["def decide(y, bd):"]
                    + [f"    bd{i} = bd[{j}]" for i, j in enumerate(pos)]
                    + ["    " + line for line in decide.symmetric_decide("y", "c", bits)]
                    + ["    bits = " + " | ".join(f"(U32(c_{lv}) << U32({lv}))"
                                                   for lv in range(bits)),
                       "    assert bits == c", "    return c"])
    env = {"U32": np.uint32, "np": np}
    exec(src, env)
    ys = np.concatenate([bd, np.nextafter(bd, np.float32(-np.inf)),
                         np.nextafter(bd, np.float32(np.inf)),
                         np.float32([0.0, -0.0, np.inf, -np.inf, 1.0, -1.0]),
                         np.random.default_rng(bits).standard_normal(400).astype(np.float32)
                         * 0.3])
    for y in ys.astype(np.float32):
        want = cpu_q.encode_value(y, bd)
        tie = y < 0 and np.any(bd == -y)
        assert env["decide"](y, bd) == want - tie, y


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
def test_heap_decision_matches_cpu_count(bits):
    """The bisection over boundaries in shared memory in heap order gives the CPU's code for
    every ``y``, values exactly on a boundary, ±0 and NaN included."""
    cpu_q = importlib.import_module("rotorq.cpu.quantize")
    tq = rotorq.TurboQuant(32, bits, rotation="hadamard", norm_dtype="float32")
    bd = np.asarray(tq.boundaries, np.float32)
    heap = np.zeros(1 << bits, np.float32)
    heap[1:] = bd[list(decide.heap_order(bits))]
    src = "\n".join(["def decide(y, bs):"]
                    + ["    " + line for line in decide.heap_decide("y", "c", bits)]
                    + ["    return c"])
    env = {"U32": np.uint32}
    exec(src, env)
    ys = np.concatenate([bd, np.nextafter(bd, np.float32(-np.inf)),
                         np.nextafter(bd, np.float32(np.inf)),
                         np.float32([0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, -1.0]),
                         np.random.default_rng(bits).standard_normal(200).astype(np.float32)
                         * 0.3])
    for y in ys.astype(np.float32):
        assert env["decide"](y, heap) == cpu_q.encode_value(y, bd), y


@pytest.mark.parametrize("bits", (1, 2, 3, 4))
@pytest.mark.parametrize("half", (True, False))
def test_decision_choice(bits, half):
    """Registers up to REG_BITS bits, sign and magnitude for fp16 rows of 2 to SYM_BITS bits,
    else the heap; every decision has its source-line function."""
    kind = decide.decision(bits, half)
    if half and 2 <= bits <= decide.SYM_BITS:
        assert kind == "sym"
    else:
        assert kind == ("regs" if bits <= decide.REG_BITS else "heap")
    assert kind in decide.LINES
