"""Shared fixtures: fresh random inputs every run, with the seed reported on failure."""

import os

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A generator seeded freshly each run (set ROTORQ_TEST_SEED to replay a failure)."""
    seed = int(os.environ.get("ROTORQ_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("rotorq", f"replay with ROTORQ_TEST_SEED={seeds[0]}"))


def unit_vectors(rng, n, d, dtype=np.float64):
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def outlier_vectors(rng, n, d, channels=4, factor=15.0):
    """Unit vectors after scaling a few fixed channels by ``factor`` (MATH.md §6)."""
    x = rng.standard_normal((n, d))
    x[:, rng.choice(d, channels, replace=False)] *= factor
    return x / np.linalg.norm(x, axis=1, keepdims=True)
