"""Threads sharing one KVCache: every token kept, no reader sees half an append."""

import threading

import numpy as np
import pytest

import rotorq

H, D, THREADS, PER_THREAD = 2, 32, 4, 300
MARK = 10.0  # thread i's keys carry MARK on channel i: the scores tell whose token is where


def _tokens(rng):
    k = rng.standard_normal((THREADS, H, PER_THREAD, D)).astype(np.float32)
    for i in range(THREADS):
        k[i, :, :, i] += MARK
    v = rng.standard_normal((THREADS, H, PER_THREAD, D)).astype(np.float32)
    return k, v


def _run(threads):
    errors = []

    def guarded(target):
        def run():
            try:
                target()
            except BaseException as exc:  # re-raised in the main thread
                errors.append(exc)
        return run

    workers = [threading.Thread(target=guarded(t)) for t in threads]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("kwargs", [dict(), dict(residual_bits=None, sink_tokens=2)])
def test_four_threads_appending_keep_every_token(rng, kwargs):
    """4 threads × 300 single-token appends into one cache, while a fifth thread reads
    scores: 1,200 tokens kept, each thread's in its own order; the cache equals a serial
    cache fed the same tokens in the order they landed (attend bit for bit), and every
    score read concurrently equals the serial cache's at the same length."""
    kw = dict(residual_tokens=16, offset_tokens=32) | kwargs
    k, v = _tokens(rng)
    cache = rotorq.KVCache(H, D, **kw)
    marks = np.zeros((H, THREADS, D), np.float32)  # query i reads channel i
    marks[:, np.arange(THREADS), np.arange(THREADS)] = 1.0
    start = threading.Barrier(THREADS + 1)
    done = threading.Event()
    seen = []

    def writer(i):
        def run():
            start.wait()
            for j in range(PER_THREAD):
                cache.append(k[i, :, j:j + 1], v[i, :, j:j + 1])
        return run

    def reader():
        start.wait()
        while not done.is_set() and len(seen) < 60:
            if len(cache):
                seen.append(cache.scores(marks))

    def writers():
        _run([writer(i) for i in range(THREADS)])
        done.set()

    _run([writers, reader])
    assert len(cache) == THREADS * PER_THREAD

    # whose token is at each position: the channel of the largest score
    owner = cache.scores(marks)[0].argmax(axis=0)
    assert np.bincount(owner, minlength=THREADS).tolist() == [PER_THREAD] * THREADS
    serial = rotorq.KVCache(H, D, **kw)
    nxt = [0] * THREADS
    by_length = {s.shape[-1]: s for s in seen}
    for n, i in enumerate(owner, start=1):
        j = nxt[i]
        nxt[i] += 1
        serial.append(k[i, :, j:j + 1], v[i, :, j:j + 1])
        if n in by_length:  # a concurrent read saw this state, whole
            np.testing.assert_allclose(by_length.pop(n), serial.scores(marks), rtol=1e-6,
                                       atol=1e-5)
    assert not by_length
    q = rng.standard_normal((2 * H, 3, D)).astype(np.float32)
    np.testing.assert_array_equal(cache.attend(q), serial.attend(q))
    np.testing.assert_array_equal(cache.attend(q, causal=True), serial.attend(q, causal=True))
    assert cache.nbytes == serial.nbytes
