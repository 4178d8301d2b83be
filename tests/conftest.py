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


SIMULATOR_TEST = "test_cuda_simulator.py::test_cuda_kernels_under_the_simulator"


def pytest_collection_modifyitems(session, config, items):
    """Start the simulator run (``tests/test_cuda_simulator.py``) in the background as soon
    as it is selected, and move its test last: it overlaps the rest of the run."""
    sim = [it for it in items if it.nodeid.endswith(SIMULATOR_TEST)]
    if not sim or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return
    import importlib.util
    if importlib.util.find_spec("numba.cuda") is None:
        return
    items[:] = [it for it in items if it not in sim] + sim
    mod = sim[0].module
    config.stash[mod.STARTED] = mod.start()
    config.stash[_STARTED_BY_US] = mod.STARTED


_STARTED_BY_US = pytest.StashKey()


def pytest_unconfigure(config):
    key = config.stash.get(_STARTED_BY_US, None)
    started = config.stash.get(key, None) if key is not None else None
    if started is not None and started[0].poll() is None:  # the run was interrupted
        started[0].kill()
