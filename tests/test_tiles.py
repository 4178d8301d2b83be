"""The tile layout of packed codes (rotorq.tiles) and the KV cache holding it."""

import numpy as np
import pytest

import rotorq
from rotorq import cpu, tiles
from rotorq._ops import KeyPart, RotatedQuery, ValuePart

CASES = [(kind, dim, bits) for kind in ("keys", "values") for dim in (128, 256)
         for bits in (1, 2, 3, 4)]


def _lane_words(lane, n_words):
    """Tile words of a lane's ``n_words`` words: 16-byte chunks at ``128c + 4·lane``, an
    8-byte rest at ``128F + 2·lane``."""
    full = n_words // 4
    out = [128 * c + 4 * lane + i for c in range(full) for i in range(4)]
    return out + [128 * full + 2 * lane + i for i in range(n_words - 4 * full)]


@pytest.mark.parametrize("kind,dim,bits", CASES)
def test_order_is_a_permutation_with_the_lane_pieces(kind, dim, bits):
    """Every bit of a tile's 16 rows has one place, and each lane's words hold what the
    kernel reads: keys, quarter t of tokens g and g + 8; values, eighth g of tokens
    (2t, 2t+1), then (2t+8, 2t+9), the two tokens' codes of each coordinate side by side."""
    o = tiles.order(kind, dim, bits)
    nbits = dim * bits
    assert o.shape == (16, nbits)
    np.testing.assert_array_equal(np.sort(o.ravel()), np.arange(16 * nbits))
    where = np.empty((16 * nbits, 2), np.int64)  # tile bit -> (token, bit of its row)
    for r in range(16):
        where[o[r], 0], where[o[r], 1] = r, np.arange(nbits)
    n_words = 2 * nbits // 128  # per lane, keys and values alike
    for lane in range(32):
        g, t = divmod(lane, 4)
        tile_bits = np.array([32 * w + b for w in _lane_words(lane, n_words)
                              for b in range(32)])
        got = where[tile_bits]
        if kind == "keys":
            q = nbits // 4
            want_tok = [g] * q + [g + 8] * q
            want_bit = list(range(t * q, (t + 1) * q)) * 2
        else:
            nc = dim // 8
            want_tok, want_bit = [], []
            for pair in range(2):
                for j in range(nc):
                    for h in range(2):
                        want_tok += [2 * t + 8 * pair + h] * bits
                        want_bit += [(g * nc + j) * bits + k for k in range(bits)]
        np.testing.assert_array_equal(got[:, 0], want_tok)
        np.testing.assert_array_equal(got[:, 1], want_bit)


def test_norm_slots_pair_tokens_g_and_g_plus_8():
    s = tiles.norm_slots()
    np.testing.assert_array_equal(np.sort(s), np.arange(16))
    for g in range(8):
        assert (s[g], s[g + 8]) == (2 * g, 2 * g + 1)


def test_store_load_round_trip_in_pieces(rng):
    """Appends of any length at any offset (partial tiles, tile boundaries), read back in
    token order; slots never written keep their contents."""
    dim, bits, n = 128, 3, 83
    rows = rng.integers(0, 256, (3, n, dim * bits // 8), dtype=np.uint8)
    nrm = rng.standard_normal((3, n)).astype(np.float16)
    codes = np.zeros((3, 96, rows.shape[2]), np.uint8)
    norms = np.zeros((3, 96), np.float16)
    cuts = np.sort(rng.choice(np.arange(1, n), 6, replace=False))
    for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
        tiles.store(np, codes, norms, rows[:, lo:hi], nrm[:, lo:hi], lo, "keys", dim, bits)
    back, bn = tiles.load(np, codes, norms, 0, n, "keys", dim, bits)
    np.testing.assert_array_equal(back, rows)
    np.testing.assert_array_equal(bn, nrm)
    mid, mn = tiles.load(np, codes, norms, 17, 40, "keys", dim, bits)
    np.testing.assert_array_equal(mid, rows[:, 17:40])
    np.testing.assert_array_equal(mn, nrm[:, 17:40])
    # the 13 slots past the last token: untouched zeros
    tail, tn = tiles.load(np, codes, norms, n, 96, "keys", dim, bits)
    assert not tail.any() and not tn.any()
    empty, en = tiles.load(np, codes, norms, 5, 5, "keys", dim, bits)
    assert empty.shape == (3, 0, 48) and en.shape == (3, 0)


def test_bad_arguments():
    assert not tiles.supported(96, 3) and not tiles.supported(128, 0)
    assert tiles.supported(256, 4)
    with pytest.raises(ValueError, match="kind"):
        tiles.order("queries", 128, 3)
    with pytest.raises(ValueError, match="cannot be tiled"):
        tiles.order("keys", 64, 3)


# -- the KV cache holding tiles (the GPU's layout), checked with the CPU backend -----------
def _tiles_everywhere(monkeypatch):
    """The CPU backend answers like the GPU's: tiles wherever they apply."""
    def layout(key_dim, key_bits, key_mode, value_dim, value_bits):
        ok = key_mode == "mse" and tiles.supported(key_dim, key_bits) and tiles.supported(
            value_dim, value_bits)
        return "tiles" if ok else "rows"
    monkeypatch.setattr(cpu, "attention_layout", layout)


@pytest.mark.parametrize("rotation", ["hadamard", "rotor"])
def test_cache_in_tiles_equals_cache_in_rows(rng, monkeypatch, rotation):
    """Streaming appends (blocks of 5 tokens: partial tiles, growth past 256 tokens) into a
    cache holding tiles give the same codes, attention, scores and sizes as the row layout."""
    d, heads, t = 128, 2, 330
    k = rng.standard_normal((heads, t, d), dtype=np.float32) + 1.0
    v = rng.standard_normal((heads, t, d), dtype=np.float32)
    kw = dict(key_bits=3, value_bits=3, residual_tokens=7, block_tokens=5, rotation=rotation,
              offset_tokens=16)
    rows_cache = rotorq.KVCache(heads, d, **kw)
    rows_cache.append(k, v)
    _tiles_everywhere(monkeypatch)
    tiled = rotorq.KVCache(heads, d, **kw)
    for a in range(0, t, 37):
        tiled.append(k[:, a:a + 37], v[:, a:a + 37])
    st, st_rows = tiled._state, rows_cache._state
    if rotation == "rotor":  # stored_dim 129: not tileable, rows kept
        assert st.base.keys.layout == "rows"
    else:
        assert st.base.keys.layout == st.base.values.layout == "tiles"
        assert st.window.keys.layout == "rows"
    c = tiled.compressed_tokens
    assert c == rows_cache.compressed_tokens and c > 256
    for codes_a, codes_b in ((st_rows.base.keys, st.base.keys),
                             (st_rows.base.values, st.base.values)):
        for i in range(len(codes_a.parts)):
            for got, want in zip(codes_b.rows(np, i, 0, c), codes_a.rows(np, i, 0, c),
                                 strict=True):
                np.testing.assert_array_equal(got, want)
    q = rng.standard_normal((8, 3, d), dtype=np.float32)
    np.testing.assert_array_equal(tiled.attend(q, causal=True), rows_cache.attend(q, causal=True))
    np.testing.assert_array_equal(tiled.scores(q), rows_cache.scores(q))
    assert tiled.nbytes == rows_cache.nbytes


def test_decode_attention_layout_argument(rng):
    q = np.zeros((1, 1, 128), np.float32)
    key = KeyPart(np.zeros((1, 16, 48), np.uint8), np.zeros((1, 16), np.float16),
                  np.zeros(8, np.float32), 3)
    val = ValuePart(np.zeros((1, 16, 48), np.uint8), np.zeros((1, 16), np.float16),
                    np.zeros(8, np.float32), 3, 128)
    with pytest.raises(ValueError, match="layout"):
        cpu.decode_attention((RotatedQuery(q),), (key,), (val,), 4, 1, 4, layout="columns")
    with pytest.raises(ValueError, match="one MSE key part"):
        cpu.decode_attention((RotatedQuery(q), RotatedQuery(q)), (key, key), (val,), 4, 1, 4,
                             layout="tiles")
