"""The builder of generated kernels (:mod:`rotorq.cuda.gen.build`) and the generators' spec
factories, without a GPU: ``cuda.jit`` compiles lazily, so building a kernel only runs its
generated source as Python."""

import importlib
import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("builder checks run in the normal test process", allow_module_level=True)
pytest.importorskip("numba.cuda")

build = importlib.import_module("rotorq.cuda.gen.build")
attention = importlib.import_module("rotorq.cuda.gen.attention")
key_bias = importlib.import_module("rotorq.cuda.gen.key_bias")
quantize = importlib.import_module("rotorq.cuda.gen.quantize")
quantize_rotor = importlib.import_module("rotorq.cuda.gen.quantize_rotor")
score_tiles = importlib.import_module("rotorq.cuda.gen.score_tiles")
scores_group = importlib.import_module("rotorq.cuda.gen.scores_group")
scores_one = importlib.import_module("rotorq.cuda.gen.scores_one")
scores_rows = importlib.import_module("rotorq.cuda.gen.scores_rows")
wht = importlib.import_module("rotorq.cuda.gen.wht")


def _specs():
    """One spec of every generator (small shapes: quick to generate)."""
    return [wht.spec(32, True, False, 4), quantize.spec(32, 32, 3, True, False, True, 8),
            quantize_rotor.spec(30, 2, False, True, rows=4), scores_one.spec(64, 3, 16),
            scores_group.spec(64, 2, 1, 1), scores_rows.spec(32, 3, 4),
            attention.spec(128, 3, 128, 3, tiled=True), key_bias.spec(20)]


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: type(s).__name__)
def test_build_is_cached_per_spec(spec):
    """One kernel per spec: an equal spec (a fresh object) gets the same kernel, whose
    ``spec``, ``source`` and launch attributes are the generator's."""
    kern = build.build(spec)
    again = type(spec)(*(getattr(spec, f) for f in spec.__dataclass_fields__))
    assert again == spec and again is not spec
    assert build.build(again) is kern and spec.build() is kern
    assert kern.spec == spec
    assert kern.source == spec.source() == "\n".join(spec.generate().lines) + "\n"
    for name, value in spec.generate().attrs.items():
        assert getattr(kern, name) == value
    assert kern.py_func.__name__ == spec.generate().name


def test_specs_differ_by_every_knob():
    """Specs that differ in one knob are different kernels with different sources."""
    a, b = wht.spec(128, True, True), wht.spec(128, True, True, threads=128)
    assert a != b and build.build(a) is not build.build(b)
    assert a.source() != b.source()
    one = scores_one.spec(128, 3)
    assert scores_one.spec(128, 3, early=False).source() != one.source()


def test_dump_writes_each_source_by_spec(tmp_path):
    specs = _specs()
    paths = build.dump(specs, tmp_path / "src")
    assert len(set(paths)) == len(specs)
    for spec, path in zip(specs, paths, strict=True):
        assert os.path.basename(path) == spec.slug() + ".py"
        with open(path) as f:
            assert f.read() == spec.source()
    assert "stored_dim=32" in wht.spec(32, True, False, 4).slug()


def test_spec_factories_resolve_defaults():
    """Every knob is in the spec: the defaults the factories pick."""
    assert quantize.spec(128, 128, 3, True, False, True).blocks == 5
    assert quantize.spec(128, 128, 3, False, False, True).blocks == 3
    assert quantize.spec(128, 128, 3, True, True, True).blocks == 3
    assert quantize.spec(128, 128, 3, True, False, True, blocks=4).blocks == 4
    assert quantize_rotor.spec(128, 3, True, False).regs == quantize_rotor.REGS_HALF
    assert quantize_rotor.spec(128, 3, False, False).regs == 80
    one = scores_one.spec(128, 3)
    assert (one.threads, (one.group, one.half_table)) == score_tiles.one_query_config(128, 3)
    assert one.per_sm == score_tiles.BLOCKS_PER_SM_SMALL
    assert scores_one.spec(256, 3).per_sm == score_tiles.BLOCKS_PER_SM
    rows = attention.spec(128, 3, 128, 3)
    assert (rows.launch_blocks, rows.prefetch, rows.tiled) == (attention.LAUNCH_BLOCKS, 1, False)
    assert (rows.key_copies, rows.value_copies) == attention.table_copies(128, 3, 128, 3)
    assert attention.spec(128, 3, 128, 3, tiled=True).prefetch == attention.PREFETCH
    assert attention.spec(256, 3, 256, 3).launch_blocks is None  # wider heads: uncapped
    assert attention.spec(128, 3, 128, 3, blocks=0).launch_blocks is None
    assert attention.spec(128, 3, 128, 3, copies=(1, 1)).key_copies == 1
    assert key_bias.spec(64) == key_bias.spec(57) == key_bias.KeyBiasSpec(8)


def test_attention_launch_bounds():
    """Capped kernels carry their launch bounds; uncapped ones none."""
    assert attention.kernel(128, 3, 128, 3).launch_bounds == (32 * attention.WARPS,
                                                              attention.LAUNCH_BLOCKS)
    assert not hasattr(attention.kernel(128, 3, 128, 3, blocks=0), "launch_bounds")


@pytest.mark.parametrize("make,match", [
    (lambda: quantize_rotor.spec(128, 3, True, False, rows=6), "multiple of 4"),
    (lambda: key_bias.spec(0), "frequencies"),
    (lambda: key_bias.spec(65), "frequencies"),
    (lambda: wht.spec(128, True, True, threads=12).source(), "multiple of D/16"),
])
def test_bad_specs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_attention_config():
    """The tensor-core kernel takes D % 128 == 0 up to 512, 1–4 bits, whole packed rows and
    pair tables within the static shared memory."""
    assert attention.config(128, 3, 128, 3, 48, 48) == (128, 3, 128, 3)
    assert attention.config(96, 3, 128, 3, 36, 48) is None
    assert attention.config(128, 5, 128, 3, 80, 48) is None
    assert attention.config(128, 3, 128, 3, 49, 48) is None
    assert attention.config(128, 4, 512, 4, 64, 256) is None  # tables do not fit
