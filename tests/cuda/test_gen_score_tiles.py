"""Which shapes the generated tiled score kernels take, their table plans and the bank model
of their code tiles (:mod:`rotorq.cuda.gen.score_tiles`): no GPU or simulator needed."""

import importlib

sct = importlib.import_module("rotorq.cuda.gen.score_tiles")
scores_one = importlib.import_module("rotorq.cuda.gen.scores_one")


def test_applies_and_strides():
    """Which shapes the tiled kernels take; code-tile reads of the benchmark shape are
    conflict-free (one wavefront per warp access)."""
    assert sct.applies(128, 3, 1) and sct.applies(128, 3, 8) and sct.applies(128, 2, 5)
    assert sct.applies(128, 4, 1) and not sct.applies(128, 1, 1)
    assert not sct.applies(96, 3, 8)  # D·bits not a multiple of 128: lanes' words not aligned
    assert sct.group_size(128, 3) == 2 and sct.group_size(128, 2) == 2
    assert sct.group_size(128, 4) == 1
    # the one-query kernel's static shared memory fits 48 KB at every size it takes: smaller
    # blocks, then smaller float32 tables, else not applicable (4 bits from D = 384)
    for d in range(32, 513, 32):
        for bits in (2, 3, 4):
            config = sct.one_query_config(d, bits)
            assert (config is not None) == sct.applies(d, bits, 1)
            if config:
                assert sct.one_shared_bytes(d, bits, *config) <= sct.STATIC_SHARED
    assert sct.one_query_config(512, 3) == (128, (1, False))
    assert sct.one_query_config(384, 4) is None and not sct.applies(512, 4, 1)
    # a group's table within the 32 banks' 128 bytes: one wavefront per random warp lookup
    for d, bits in ((128, 2), (128, 3), (128, 4), (96, 2), (256, 3)):
        g, half = sct.table_plan(d, bits)
        assert (2 if half else 4) << (g * bits) <= 128 and d % g == 0
    w = 12
    s = sct.pick_stride(w, lambda s: [[t * s + k for t in range(32)] for k in range(w)])
    assert s == 13
    src = scores_one.spec(128, 3).source()
    assert "ct[rb + U32(11)]" in src and "rb = U32(tid) * U32(13)" in src
    # constant table row per pair (folds into the shared load's address), 64-bit code words
    assert "half_float(tab[63, (q5 >> U64(58)) & U64(63)])" in src
    assert "tab[10, ((q0 >> U64(60)) | (q1 << U64(4))) & U64(63)]" in src
