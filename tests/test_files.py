"""Files and hand-made codes are untrusted input: ``rotorq.load`` and the ``QuantizedVectors``
constructor refuse anything but exactly the arrays a config implies, and every quantizer
checks the codes' layout before a kernel reads them (issue 23, item 1)."""

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from numpy.lib import format as npf

import rotorq
from rotorq._arrays import Origin
from rotorq.quantized import QuantizedVectors


def _meta(config, fmt=1):
    return np.array(json.dumps({"format": fmt, "config": config}))


def _save(path, config, **arrays):
    np.savez(path, __meta__=_meta(config), **arrays)
    return path


def _zip(path, members):
    """An archive of raw members ``{name: bytes}`` (no checks of any kind)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npy_header(shape, dtype):
    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, {"descr": npf.dtype_to_descr(np.dtype(dtype)),
                                     "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.fixture(params=[("mse", "hadamard"), ("prod", "rotor")], ids=["mse", "prod"])
def made(request, rng):
    mode, rotation = request.param
    tq = rotorq.TurboQuant(100, 3, mode=mode, rotation=rotation, seed=int(rng.integers(1 << 30)))
    qv = tq.quantize(rng.standard_normal((2, 5, 100)))
    return tq, qv


def _parts(qv):
    return {k: np.array(v) for k, v in qv.parts.items()}


# -- the interpreter must survive whatever a file holds ------------------------------------

CRASH = """
import json, numpy as np, rotorq
cfg = rotorq.TurboQuant({dim}, 8).config
np.savez("evil.npz", __meta__=np.array(json.dumps({{"format": 1, "config": cfg}})),
         codes=np.zeros((2, 1), np.uint8), norms=np.ones(2, np.float16))
try:
    qv = rotorq.load("evil.npz")
    rotorq.TurboQuant.from_config(qv.config).dequantize(qv)
except ValueError as exc:
    print("refused:", exc)
"""


@pytest.mark.parametrize("dim", [1 << 26, 128])
def test_the_crash_file_is_refused_in_a_subprocess(tmp_path, dim):
    """The issue's file: a huge config over 1-byte code rows (SIGSEGV, exit 139), or a
    dim-128 one (heap bytes read past the array). Run apart so a crash cannot kill pytest."""
    out = subprocess.run([sys.executable, "-c", CRASH.format(dim=dim)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("refused:") and "rows of" in out.stdout, out.stdout


FUZZ = """
import numpy as np, rotorq
from rotorq.quantized import QuantizedVectors
rng = np.random.default_rng({seed})
quantizers = [rotorq.TurboQuant(d, b, mode=m, rotation=r) for d, b, m, r in
              [(64, 3, "mse", "hadamard"), (50, 4, "prod", "rotor"), (33, 8, "mse", "dense"),
               (16, 2, "prod", "hadamard")]] + [rotorq.QJL(40, 72)]
attempts = refused = 0
for trial in range(400):
    tq = quantizers[trial % len(quantizers)]
    qv = tq.quantize(rng.standard_normal((3, 4, tq.dim)))
    name = sorted(qv.parts)[rng.integers(len(qv.parts))]
    a = qv.parts[name]
    kind = rng.integers(5)
    if kind == 0:  # shorter or longer rows, or one value instead of rows
        a = np.zeros(a.shape[:-1] + (int(rng.integers(0, 3 * a.shape[-1] + 2)),), a.dtype)
    elif kind == 1:  # another dtype
        a = a.astype(rng.choice([np.int64, np.float64, np.int8, np.float32, np.uint16]))
    elif kind == 2:  # another leading shape
        a = np.resize(a, (int(rng.integers(1, 5)),) + a.shape[1:])
    elif kind == 3:  # a part too few or too many
        a = None
    else:  # another rank
        a = a.reshape((-1,) + a.shape[2:]) if a.ndim > 1 else a[None]
    parts = dict(qv.parts)
    if a is None:
        del parts[name]
        if rng.integers(2):
            parts["extra"] = np.zeros(3, np.uint8)
    else:
        parts[name] = a
    qv.parts = parts  # codes changed after they were made: the quantizer must check them
    calls = [lambda: tq.scores(rng.standard_normal((2, tq.dim)), qv)]
    if hasattr(tq, "dequantize"):
        calls.append(lambda: tq.dequantize(qv))
    for call in calls:
        attempts += 1
        try:
            call()
        except (ValueError, TypeError):
            refused += 1
print("survived", attempts, refused)
"""


def test_fuzzed_codes_never_reach_a_kernel(rng):
    """Codes whose arrays were replaced after quantization (shorter rows, other dtypes,
    other leading shapes, missing or extra arrays) are refused by every verb before a kernel
    runs; in a subprocess, since a regression could crash the interpreter."""
    out = subprocess.run([sys.executable, "-c", FUZZ.format(seed=int(rng.integers(1 << 30)))],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    word, attempts, refused = out.stdout.split()
    # A few mutations leave valid codes (a resize to the same shape); the rest are refused.
    assert word == "survived" and int(refused) > 0.9 * int(attempts), out.stdout


# -- load ---------------------------------------------------------------------------------

def test_round_trip_of_every_kind(tmp_path, rng):
    for q in (rotorq.TurboQuant(50, 1), rotorq.TurboQuant(50, 8, rotation="dense"),
              rotorq.TurboQuant(50, 4, mode="prod", qjl_dim=20, norm_dtype="float32",
                                norm_correction=True, codebook="beta", seed=2 ** 64 - 1),
              rotorq.QJL(50, 30, seed=9)):
        qv = q.quantize(rng.standard_normal((3, 50)))
        qv.save(tmp_path / "a.npz")
        back = rotorq.load(tmp_path / "a.npz")
        assert back.config == qv.config
        for name, a in qv.parts.items():
            assert back.parts[name].dtype == a.dtype
            np.testing.assert_array_equal(back.parts[name], a)
        np.testing.assert_array_equal(type(q).from_config(back.config).scores(
            rng.standard_normal((1, 50)) * 0 + 1, back), q.scores(np.ones((1, 50)), qv))


def test_one_vector_round_trips(tmp_path, rng):
    qv = rotorq.TurboQuant(8, 4).quantize(rng.standard_normal(8))
    qv.save(tmp_path / "a.npz")
    assert rotorq.load(tmp_path / "a.npz").shape == (8,)


@pytest.mark.parametrize("case,match", [
    ("bits", "rows of"),                      # a 4-bit config over 3-bit codes
    ("nan_norms", "finite and non-negative"),
    ("inf_norms", "finite and non-negative"),
    ("negative_norms", "finite and non-negative"),
    ("int64_codes", "uint8"),
    ("float64_norms", "float16"),
    ("float32_norms", "float16"),
    ("big_endian_norms", "float16"),
    ("extra_array", "unexpected \\['junk'\\]"),
    ("missing_norms", "missing \\['norms'\\]"),
    ("truncated_rows", "rows of"),
    ("leading_shapes", "leading shape"),
    ("codes_one_dim", "rows of"),
])
def test_bad_arrays_are_refused(tmp_path, made, case, match):
    _, qv = made
    parts, cfg = _parts(qv), dict(qv.config)
    if case == "bits":
        cfg["bits"] = 4
    elif case == "nan_norms":
        parts["norms"][1, 2] = np.nan
    elif case == "inf_norms":
        parts["norms"][0, 0] = np.inf
    elif case == "negative_norms":
        parts["norms"][1, 1] = -1.0
    elif case == "int64_codes":
        parts["codes"] = parts["codes"].astype(np.int64)
    elif case == "float64_norms":
        parts["norms"] = parts["norms"].astype(np.float64)
    elif case == "float32_norms":
        parts["norms"] = parts["norms"].astype(np.float32)
    elif case == "big_endian_norms":
        parts["norms"] = parts["norms"].astype(">f2")
    elif case == "extra_array":
        parts["junk"] = np.zeros(10, np.uint8)
    elif case == "missing_norms":
        del parts["norms"]
    elif case == "truncated_rows":
        parts["codes"] = parts["codes"][..., :-1]
    elif case == "leading_shapes":
        parts["norms"] = parts["norms"][:, :4]
    elif case == "codes_one_dim":
        parts["codes"] = parts["codes"][..., 0]
    path = _save(tmp_path / "bad.npz", cfg, **parts)
    with pytest.raises((ValueError, TypeError), match=match):
        rotorq.load(path)
    with pytest.raises((ValueError, TypeError), match=match.replace("leading shape", "leading")):
        QuantizedVectors(parts, cfg)


@pytest.mark.parametrize("change,match", [
    ({"seed": 1.5}, "seed must be an int"),
    ({"seed": -1}, "seed must be in"),
    ({"norm_correction": "no"}, "norm_correction must be True or False"),
    ({"bits": 3.0}, "bits must be an int"),
    ({"dim": 0}, "dim must be a positive int"),
    ({"rotation": "givens"}, "rotation must be one of"),
    ({"mode": ["mse"]}, "mode must be one of"),
    ({"qjl_dim": 64}, "qjl_dim"),
    ({"colour": "red"}, "unknown keys \\['colour'\\]"),
    ({"method": "pq"}, "names no rotorq method"),
    ({"method": None}, "names no rotorq method"),
])
def test_lying_configs_are_refused(tmp_path, rng, change, match):
    qv = rotorq.TurboQuant(32, 3).quantize(rng.standard_normal((4, 32)))
    cfg = {**qv.config, **change}
    path = _save(tmp_path / "bad.npz", cfg, **_parts(qv))
    with pytest.raises((ValueError, TypeError), match=match):
        rotorq.load(path)
    with pytest.raises((ValueError, TypeError), match=match):
        QuantizedVectors(_parts(qv), cfg)


def test_configs_must_be_complete(tmp_path, rng):
    qv = rotorq.TurboQuant(32, 3, mode="prod").quantize(rng.standard_normal((4, 32)))
    for key in ("norm_dtype", "qjl_dim", "seed", "dim"):
        cfg = {k: v for k, v in qv.config.items() if k != key}
        with pytest.raises(ValueError, match=key):
            rotorq.load(_save(tmp_path / "bad.npz", cfg, **_parts(qv)))
    cfg = {**qv.config, "method": "qjl"}  # another method's config over these arrays
    with pytest.raises(ValueError, match="unknown keys"):
        rotorq.load(_save(tmp_path / "bad.npz", cfg, **_parts(qv)))


@pytest.mark.parametrize("content,match", [
    (b"", "not an .npz archive"),
    (b"hello, world" * 100, "not an .npz archive"),
    (b"PK\x03\x04" + bytes(200), "not an .npz archive"),
])
def test_garbage_is_refused(tmp_path, content, match):
    path = tmp_path / "x.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        rotorq.load(path)


def test_an_npy_file_is_refused(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(10))
    with pytest.raises(ValueError, match=r"not an .npz archive"):
        rotorq.load(path)


def test_pickles_are_refused(tmp_path, rng):
    qv = rotorq.TurboQuant(32, 3).quantize(rng.standard_normal((4, 32)))
    path = tmp_path / "p.npz"
    np.savez(path, __meta__=_meta(qv.config), codes=np.array([{"a": 1}] * 4, dtype=object),
             norms=qv.norms)
    with pytest.raises(ValueError, match="pickle"):
        rotorq.load(path)
    np.savez(path, __meta__=np.array([{"format": 1}], dtype=object), **_parts(qv))
    with pytest.raises(ValueError, match="pickle"):
        rotorq.load(path)


@pytest.mark.parametrize("meta,match", [
    (np.array('{"format": 99}'), "format"),  # unsupported and incomplete
    (np.array(json.dumps({"format": 99, "config": {}})), "unsupported rotorq format 99"),
    (np.array(json.dumps({"format": True, "config": {}})), "unsupported rotorq format True"),
    (np.array("{not json"), "unreadable __meta__"),
    (np.array("[1, 2]"), "must hold exactly 'format' and 'config'"),
    (np.array(json.dumps({"format": 1, "config": {}, "x": 1})), "exactly 'format' and 'config'"),
    (np.array(json.dumps({"format": 1, "config": [1]})), "config must be a dict"),
    (np.arange(3), "__meta__ must be a string"),
])
def test_bad_metadata_is_refused(tmp_path, rng, meta, match):
    qv = rotorq.TurboQuant(32, 3).quantize(rng.standard_normal((4, 32)))
    path = tmp_path / "m.npz"
    np.savez(path, __meta__=meta, **_parts(qv))
    with pytest.raises(ValueError, match=match):
        rotorq.load(path)


def test_missing_metadata_is_refused(tmp_path, rng):
    qv = rotorq.TurboQuant(32, 3).quantize(rng.standard_normal((4, 32)))
    np.savez(tmp_path / "m.npz", **_parts(qv))
    with pytest.raises(ValueError, match="no __meta__"):
        rotorq.load(tmp_path / "m.npz")


def test_zips_that_lie_are_refused_before_reading(tmp_path, rng):
    qv = rotorq.TurboQuant(32, 3).quantize(rng.standard_normal((4, 32)))
    meta, norms = _npy(_meta(qv.config)), _npy(qv.norms)
    # A header that declares 10**12 rows over a few bytes: refused without allocating.
    huge = _npy_header((10 ** 12, 12), np.uint8) + bytes(48)
    path = _zip(tmp_path / "h.npz", {"__meta__.npy": meta, "codes.npy": huge,
                                     "norms.npy": norms})
    with pytest.raises(ValueError, match=r"leading shape|truncated"):
        rotorq.load(path)
    huge_norms = _npy_header((10 ** 12,), np.float16) + bytes(8)
    huge_codes = _npy_header((10 ** 12, 12), np.uint8) + bytes(48)
    path = _zip(tmp_path / "h2.npz", {"__meta__.npy": meta, "codes.npy": huge_codes,
                                      "norms.npy": huge_norms})
    with pytest.raises(ValueError, match="truncated"):
        rotorq.load(path)
    # Data cut short of the header's size.
    short = _npy(qv.codes)[:-5]
    path = _zip(tmp_path / "s.npz", {"__meta__.npy": meta, "codes.npy": short, "norms.npy": norms})
    with pytest.raises(ValueError, match="truncated"):
        rotorq.load(path)
    # More data than the header declares.
    path = _zip(tmp_path / "l.npz", {"__meta__.npy": meta, "codes.npy": _npy(qv.codes) + b"xx",
                                     "norms.npy": norms})
    with pytest.raises(ValueError, match="size"):
        rotorq.load(path)
    # Members that are not .npy arrays, or named twice.
    path = _zip(tmp_path / "o.npz", {"__meta__.npy": meta, "codes.npy": _npy(qv.codes),
                                     "norms.npy": norms, "readme.txt": b"hi"})
    with pytest.raises(ValueError, match=r"unexpected member 'readme.txt'"):
        rotorq.load(path)
    with pytest.warns(UserWarning, match="Duplicate name"):
        path = _zip(tmp_path / "d.npz", {"__meta__.npy": meta, "codes.npy": _npy(qv.codes),
                                         "norms.npy": norms})
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr("norms.npy", norms)
    with pytest.raises(ValueError, match=r"unexpected member 'norms.npy'"):
        rotorq.load(path)
    # An extra member that claims 400 MB is refused by its name, before any read.
    path = _zip(tmp_path / "e.npz", {"__meta__.npy": meta, "codes.npy": _npy(qv.codes),
                                     "norms.npy": norms,
                                     "junk.npy": _npy_header((400 << 20,), np.uint8)})
    with pytest.raises(ValueError, match="unexpected \\['junk'\\]"):
        rotorq.load(path)


def test_corrupt_archive_data_is_refused(tmp_path, rng):
    qv = rotorq.TurboQuant(32, 3).quantize(rng.standard_normal((4, 32)))
    path = tmp_path / "c.npz"
    qv.save(path)
    raw = bytearray(path.read_bytes())
    codes = _npy(qv.codes)
    at = bytes(raw).index(codes[-20:])  # inside the stored codes: the CRC no longer matches
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="CRC"):
        rotorq.load(path)
    path.write_bytes(bytes(raw[: len(raw) // 2]))  # cut in half: no central directory
    with pytest.raises(ValueError, match=r"not an .npz archive"):
        rotorq.load(path)


def test_compressed_archives_load(tmp_path, rng):
    qv = rotorq.TurboQuant(32, 3, mode="prod").quantize(rng.standard_normal((4, 32)))
    np.savez_compressed(tmp_path / "z.npz", __meta__=_meta(qv.config), **_parts(qv))
    back = rotorq.load(tmp_path / "z.npz")
    np.testing.assert_array_equal(back.qjl_signs, qv.qjl_signs)


def test_load_reports_missing_files_as_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        rotorq.load(tmp_path / "nope.npz")


# -- the constructor and the quantizers' own checks ------------------------------------------

def test_constructor_checks_the_array_types_and_origin(rng):
    qv = rotorq.TurboQuant(32, 3).quantize(rng.standard_normal((4, 32)))
    with pytest.raises(TypeError, match="numpy array"):
        QuantizedVectors({"codes": qv.codes.tolist(), "norms": qv.norms}, qv.config)
    with pytest.raises(TypeError, match="must be a cupy array"):
        QuantizedVectors(_parts(qv), qv.config, Origin("cupy", "cuda"))
    with pytest.raises(TypeError, match="parts must be a dict"):
        QuantizedVectors([qv.codes, qv.norms], qv.config)
    with pytest.raises(TypeError, match="config must be a dict"):
        QuantizedVectors(_parts(qv), "turboquant")
    with pytest.raises(TypeError, match="origin"):
        QuantizedVectors(_parts(qv), qv.config, "cpu")
    ok = QuantizedVectors(_parts(qv), qv.config)
    np.testing.assert_array_equal(rotorq.TurboQuant(32, 3).dequantize(ok),
                                  rotorq.TurboQuant(32, 3).dequantize(qv))


def test_quantizers_check_codes_changed_after_they_were_made(rng):
    tq = rotorq.TurboQuant(128, 3, mode="prod")
    q = rng.standard_normal((2, 128))
    for name, bad in [("codes", lambda a: a[..., :1]), ("codes", lambda a: a.astype(np.int64)),
                      ("norms", lambda a: a[:2]), ("qjl_signs", lambda a: a[..., :3]),
                      ("qjl_norms", lambda a: a.astype(np.float32))]:
        qv = tq.quantize(rng.standard_normal((5, 128)))
        qv.parts[name] = bad(qv.parts[name])
        for call in (tq.dequantize, lambda codes: tq.scores(q, codes),
                     lambda codes: tq.prepare_scores(q, codes)):
            with pytest.raises((ValueError, TypeError), match=name):
                call(qv)
    qjl = rotorq.QJL(64, 100)
    qv = qjl.quantize(rng.standard_normal((5, 64)))
    qv.parts["qjl_signs"] = qv.parts["qjl_signs"][..., :2]
    with pytest.raises(ValueError, match="qjl_signs must have rows of 13 bytes"):
        qjl.scores(rng.standard_normal((1, 64)), qv)


def test_lying_config_and_layout_agree_with_the_built_quantizer():
    """The layout a config implies (computed without drawing the rotation) is what the
    quantizer produces, for every rotation over many dims."""
    for rotation in ("hadamard", "dense", "rotor"):
        for dim in (1, 2, 3, 5, 64, 96, 100, 129):
            for mode, bits in (("mse", 1), ("mse", 7), ("prod", 2), ("prod", 5)):
                tq = rotorq.TurboQuant(dim, bits, mode=mode, rotation=rotation)
                qv = tq.quantize(np.ones((2, dim)))
                layout = rotorq.TurboQuant._parts_layout(tq.config)
                assert {k: (str(a.dtype), a.shape[1] if a.ndim == 2 else None)
                        for k, a in qv.parts.items()} == layout
                assert tq.rotation.stored_dim == rotorq.turboquant.stored_dim_of(rotation, dim)

