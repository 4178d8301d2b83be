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
