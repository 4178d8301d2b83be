"""The shared-memory layouts of the tiled row kernels (:mod:`rotorq.cuda.gen.row_tiles`):
bank-conflict models of the benchmark shape, no GPU or simulator needed."""

import importlib

import pytest

row_tiles = importlib.import_module("rotorq.cuda.gen.row_tiles")
wht = importlib.import_module("rotorq.cuda.gen.wht")


@pytest.mark.parametrize("paired", (True, False))
def test_shared_layout_is_conflict_free(paired):
    """For the benchmark shape (D = 128, 256 threads) the chosen layouts make every warp access
    to shared memory one wavefront: float tile (16 first-phase, 16 second-phase, 16 store-pass
    accesses), fp16 word tile (8 staging stores, 8 first-phase loads), fp16 output tile."""
    gen = row_tiles.RowTiles(128, row_tiles.THREADS, True, 128)
    row_tiles.padded_strides(gen, paired)
    assert row_tiles.tile_cost(128, row_tiles.THREADS, (gen.S, gen.SH), paired) == 48
    assert row_tiles.tile_cost(128, row_tiles.THREADS, (gen.SW, gen.SHW), False, 64, True) == 16
    out = row_tiles.pick_layout(64, lambda lay: row_tiles.out_cost(gen, lay, paired))
    assert row_tiles.out_cost(gen, out, paired) == (16 if paired else 8)
    src = wht.spec(128, True, True).source()
    assert f"r = tid % U64({gen.R})" in src and f"rw = r * U64({gen.SW})" in src


def test_quantize_lane_layout_is_conflict_free():
    """Benchmark shape (D = 128, 256 threads, fp16): with lanes of 8 rows × 4 parts and the
    unpadded rows of ``_vec_strides``, every shared access of the quantize kernel's first warp
    takes the minimum wavefronts (one per 128 bytes): 16-byte first-phase stores / decision
    loads and fp16 word loads, 8-byte paired second-phase accesses, 4-byte staging stores."""
    gen = row_tiles.RowTiles(128, row_tiles.THREADS, True, 128, vec=True)
    row_tiles.vec_strides(gen)
    assert (gen.A, gen.B) == (8, 4)

    def rp(t):  # the kernel's (row, part) of thread t
        return (t % 8) | (((t >> 5) & (gen.R // 8 - 1)) << 3), ((t >> 3) & 3) | (t // (4 * gen.R) << 2)

    def wavefronts(words, width):  # lanes in groups of 128 bytes; words: first word per lane
        total = 0
        for g in range(0, 32, 32 // width):
            banks: dict = {}
            for a in words[g:g + 32 // width]:
                assert a % width == 0  # aligned vector access
                for k in range(width):
                    banks.setdefault((a + k) % 32, set()).add(a + k)
            total += max(len(v) for v in banks.values())
        return total

    lanes = range(32)
    for k in range(0, 16, 4):  # first phase / decision: 16 consecutive floats
        assert wavefronts([rp(t)[0] * gen.S + 16 * rp(t)[1] + k for t in lanes], 4) == 4
    for k in range(0, 8, 4):  # first phase: 8 consecutive fp16 words
        assert wavefronts([rp(t)[0] * gen.SW + 8 * rp(t)[1] + k for t in lanes], 4) == 4
    for k in range(8):  # second phase, paired groups 2p, 2p + 1: coordinates 2p + 16k, + 1
        assert wavefronts([rp(t)[0] * gen.S + 2 * rp(t)[1] + 16 * k for t in lanes], 2) == 2
    for i in range(8):  # staging stores: consecutive words of the tile
        assert wavefronts([(t + 256 * i) // 64 * gen.SW + (t + 256 * i) % 64 for t in lanes], 1) == 1
