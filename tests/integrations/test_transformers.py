"""rotorq.integrations.transformers: RotorqCache inside tiny random transformers models.

Tolerance of the compressed decode steps (8-bit keys and values). Logits through
RotorqCache are compared with DynamicCache's on the same tokens, relative to the standard
deviation σ of the reference logits: RMS error ≤ 0.05 σ and largest error ≤ 0.3 σ. On
these models (initializer_range 0.1, so attention is peaked and sensitive), a correct
cache measured RMS 0.017–0.023 σ and max 0.08–0.16 σ (8 seeds of Llama, 6 each of Qwen2,
Gemma 3 and a left-padded Llama batch); on Llama, a cache that stores each decode token
one step late (off by one token) gave RMS 0.22–0.32 σ and max 1.9–2.9 σ, and scores
scaled by 1.1 gave RMS 0.11–0.13 σ, max 0.48–0.58 σ (8 seeds): both fail.
``test_an_off_by_one_cache_fails_the_tolerance`` checks the first of these on every run.
The prefill is attended exactly, so its logits must match to float rounding.
"""

import inspect
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) != 5:
    pytest.skip("rotorq.integrations.transformers needs transformers 5.x", allow_module_level=True)

from transformers import (  # noqa: E402
    DynamicCache,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from rotorq.integrations import _hf_layer  # noqa: E402
from rotorq.integrations._hf_config import read  # noqa: E402
from rotorq.integrations.transformers import RotorqCache  # noqa: E402

RMS_TOL, MAX_TOL = 0.05, 0.3  # × σ of the reference logits (see the module docstring)
PREFILL_TOL = 1e-5  # × σ: the same SDPA on the same keys and values
# Small tiers so that 48 tokens reach the compressed codes: 1 sink, offset fitted on 8
# tokens, a window of 4 (+ blocks of up to 4) at residual_bits = 8.
EIGHT_BITS = dict(key_bits=8, value_bits=8, offset_tokens=8, residual_tokens=4)
VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.1, pad_token_id=0)

# transformers >= 5.2x names the forward's cache argument `cache` (`past_key_values` before)
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters \
    else "past_key_values"


def llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, **COMMON))


def qwen2():
    return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, **COMMON))


def gemma3():
    """Local (sliding window 16, RoPE base 1e4) and global (RoPE base 1e6) layers."""
    return Gemma3ForCausalLM(Gemma3TextConfig(
        num_hidden_layers=4, head_dim=32, sliding_window=16, query_pre_attn_scalar=32,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        **COMMON))


MODELS = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3}


def make(name, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    model = MODELS[name]().eval()
    model.set_attn_implementation("sdpa")
    return model


def tokens(rng, shape):
    return torch.as_tensor(rng.integers(1, VOCAB, shape), dtype=torch.long)


def teacher_forced(model, cache, ids, mask=None, prefill=24):
    """Logits of the prefill's last token and of each later token fed one at a time, with
    generate's positions for left padding; (batch, n - prefill, vocab)."""
    if mask is None:
        mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = [model(ids[:, :prefill], attention_mask=mask[:, :prefill],
                     position_ids=pos[:, :prefill], **{CACHE: cache}).logits[:, -1:]]
        for i in range(prefill, ids.shape[1] - 1):
            out.append(model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1],
                             position_ids=pos[:, i:i + 1], **{CACHE: cache}).logits)
    return torch.cat(out, 1)


def errors(got, ref):
    """(RMS, max) of ``got - ref`` in units of the reference's standard deviation."""
    sigma = ref.std()
    diff = (got - ref).abs()
    return float(diff.pow(2).mean().sqrt() / sigma), float(diff.max() / sigma)


def assert_close(got, ref):
    rms, worst = errors(got, ref)
    assert rms <= RMS_TOL and worst <= MAX_TOL, (rms, worst)


def reference(model, ids, mask=None, prefill=24):
    model.set_attn_implementation("sdpa")
    return teacher_forced(model, DynamicCache(config=model.config), ids, mask, prefill)


def assert_compressed(cache):
    """Every compressed layer holds tokens in the base tier (codes at key_bits)."""
    for i in cache.compressed_layers:
        for kv in cache.layers[i].kv_caches:
            assert kv.compressed_tokens > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_dynamic_cache_at_8_bits(name, rng):
    model = make(name, rng)
    ids = tokens(rng, (1, 48))
    ref = reference(model, ids)
    cache = RotorqCache(model, **EIGHT_BITS)
    got = teacher_forced(model, cache, ids)
    assert_compressed(cache)
    assert float((got[:, 0] - ref[:, 0]).abs().max() / ref.std()) <= PREFILL_TOL
    assert_close(got[:, 1:], ref[:, 1:])
    assert cache.get_seq_length() == 47
    assert cache.get_mask_sizes(1, cache.compressed_layers[0]) == (48, 0)


def test_an_off_by_one_cache_fails_the_tolerance(rng, monkeypatch):
    """A layer that stores each decode token one step late attends without the newest
    token: the decode tolerance must catch it."""
    model = make("llama", rng)
    ids = tokens(rng, (1, 48))
    ref = reference(model, ids)
    store = _hf_layer.RotorqLayer._store

    def late(self, keys, values, flags):
        if not self.kv_caches:
            return store(self, keys, values, flags)
        held = getattr(self, "held", None)
        self.held = (keys, values)
        if held is not None:
            store(self, *held, flags)

    monkeypatch.setattr(_hf_layer.RotorqLayer, "_store", late)
    got = teacher_forced(model, RotorqCache(model, **EIGHT_BITS), ids)
    rms, worst = errors(got[:, 1:], ref[:, 1:])
    assert rms > 2 * RMS_TOL and worst > 2 * MAX_TOL, (rms, worst)


def test_gemma3_layers_and_rope_bases(rng):
    """Global layers are compressed with their own RoPE base (1e6), local ones kept exact
    within the sliding window."""
    model = make("gemma3", rng)
    cache = RotorqCache(model, **EIGHT_BITS)
    assert cache.compressed_layers == (1, 3)
    assert cache.rope_bases == (None, 1e6, None, 1e6)
    assert [layer.kv_kwargs["rope_base"] for layer in cache.layers[1::2]] == [1e6, 1e6]
    teacher_forced(model, cache, tokens(rng, (1, 40)))
    assert cache.layers[0].keys.shape[-2] == 15  # the window's last sliding_window - 1 tokens
    assert cache.get_seq_length(0) == cache.get_seq_length(1) == 39


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_left_padded_batch(name, rng):
    """Batch 2, the second prompt left-padded by 8: logits match DynamicCache's with the
    same padding, and the padded sequence's cache is the unpadded sequence's."""
    model = make(name, rng)
    ids = tokens(rng, (2, 48))
    mask = torch.ones_like(ids)
    ids[1, :8], mask[1, :8] = 0, 0
    ref = reference(model, ids, mask)
    cache = RotorqCache(model, **EIGHT_BITS)
    got = teacher_forced(model, cache, ids, mask)
    assert_compressed(cache)
    for s in range(2):
        assert_close(got[s, 1:], ref[s, 1:])
    assert [len(kv) for kv in cache.layers[cache.compressed_layers[0]].kv_caches] == [47, 39]
    alone = teacher_forced(model, RotorqCache(model, **EIGHT_BITS), ids[1:, 8:], prefill=16)
    # equal up to the prefill's float rounding (padded vs unpadded SDPA), which may move a
    # coordinate across an 8-bit code boundary: measured up to 1.2e-3 σ; a cache that keeps
    # the 8 pads measured 0.2–0.9 σ (3 seeds, Llama and Gemma 3)
    assert float((alone - got[1:]).abs().max() / ref.std()) <= 0.02


def test_generate_matches_dynamic_cache(rng):
    """Greedy, 8 new tokens: each step's logits within the tolerance of DynamicCache's on the
    same context, so the tokens agree until a near tie (reference top-2 gap < 2·MAX_TOL σ)."""
    model = make("qwen2", rng)
    ids = tokens(rng, (1, 32))
    kw = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        cache = RotorqCache(model, **EIGHT_BITS)
        got = model.generate(ids, **{CACHE: cache}, **kw)
    assert got.sequences.shape == ref.sequences.shape == (1, 40)
    assert_compressed(cache)
    sigma = torch.cat(ref.logits).std()
    for step, (lr, lg) in enumerate(zip(ref.logits, got.logits, strict=True)):
        assert float((lg - lr).abs().max() / sigma) <= MAX_TOL
        if got.sequences[0, 32 + step] != ref.sequences[0, 32 + step]:
            top = lr[0].topk(2).values
            assert float((top[0] - top[1]) / sigma) < 2 * MAX_TOL, step
            break


def test_generate_left_padded_batch_and_default_bits(rng):
    model = make("llama", rng)
    ids = tokens(rng, (2, 24))
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    cache = RotorqCache(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, **{CACHE: cache}, max_new_tokens=8,
                             do_sample=False, pad_token_id=0)
    assert out.shape == (2, 32)
    assert [len(kv) for kv in cache.layers[0].kv_caches] == [26, 31]
    assert cache.key_bits == 4 and cache.value_bits == 3


def test_nbytes_and_bits_over_all_layers(rng):
    model = make("gemma3", rng)
    cache = RotorqCache(model, key_bits=4, value_bits=3, offset_tokens=8, residual_tokens=4)
    assert cache.nbytes == 0 and cache.bits_per_coordinate == 0.0
    teacher_forced(model, cache, tokens(rng, (1, 40)))
    compressed = sum(kv.nbytes for i in (1, 3) for kv in cache.layers[i].kv_caches)
    exact = sum(cache.layers[i].keys.numel() * 4 * 2 for i in (0, 2))  # float32 K and V
    assert cache.nbytes == compressed + exact
    coords = 2 * 39 * 2 * 32 * 2 + exact // 4
    assert cache.bits_per_coordinate == pytest.approx(8 * cache.nbytes / coords)
    kv = cache.layers[1].kv_caches[0]
    assert kv.bits_per_coordinate < 8  # the compressed layers alone: codes, window, sink
    full = RotorqCache(make("llama", rng), key_bits=4, value_bits=3)
    assert full.bits_per_coordinate == 0.0


def test_reset_gives_a_fresh_cache(rng):
    model = make("llama", rng)
    ids = tokens(rng, (1, 40))
    cache = RotorqCache(model, **EIGHT_BITS)
    first = teacher_forced(model, cache, ids)
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0
    assert torch.equal(teacher_forced(model, cache, ids), first)


def test_crop(rng):
    model = make("llama", rng)
    cache = RotorqCache(model, **EIGHT_BITS)
    cache.crop(-1)  # empty: nothing to remove
    teacher_forced(model, cache, tokens(rng, (1, 30)))
    cache.crop(0)
    assert cache.get_seq_length() == 29
    with pytest.raises(NotImplementedError, match="truncation"):
        cache.crop(-1)
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    assert not cache.is_croppable
    assert cache.get_seq_length() == 29


def test_reorder_and_select_sequences(rng):
    """Permuting or dropping sequences moves their caches; duplicating one (beam search)
    is refused before anything changes."""
    model = make("gemma3", rng)
    ids = tokens(rng, (2, 40))
    ref = teacher_forced(model, RotorqCache(model, **EIGHT_BITS), ids, prefill=24)
    cache = RotorqCache(model, **EIGHT_BITS)
    teacher_forced(model, cache, ids[:, :33], prefill=24)
    before = [list(layer.kv_caches) for layer in cache.layers[1::2]]
    with pytest.raises(NotImplementedError, match="duplicates"):
        cache.reorder_cache(torch.tensor([0, 0]))
    assert [list(layer.kv_caches) for layer in cache.layers[1::2]] == before
    cache.reorder_cache(torch.tensor([1, 0]))
    assert [list(layer.kv_caches) for layer in cache.layers[1::2]] == [b[::-1] for b in before]
    flipped = ids.flip(0)
    with torch.no_grad():
        for i in range(32, 39):
            step = model(flipped[:, i:i + 1], **{CACHE: cache}).logits
            assert torch.allclose(step.flip(0)[:, 0], ref[:, i - 23], atol=1e-4)
    cache.batch_select_indices(torch.tensor([False, True]))
    assert len(cache.layers[1].kv_caches) == 1 and cache.layers[0].keys.shape[0] == 1
    with torch.no_grad():
        step = model(ids[:1, 39:40], **{CACHE: cache}).logits
    with pytest.raises(IndexError):
        cache.batch_select_indices(torch.tensor([3]))
    with pytest.raises(NotImplementedError, match="copied"):
        cache.batch_repeat_interleave(2)
    assert step.shape == (1, 1, VOCAB)


def test_beam_search_is_refused(rng):
    model = make("llama", rng)
    with pytest.raises(NotImplementedError, match="duplicates"), torch.no_grad():
        model.generate(tokens(rng, (1, 12)), **{CACHE: RotorqCache(model)}, num_beams=2,
                       max_new_tokens=4, do_sample=False)


def test_misuse_is_refused(rng):
    model = make("llama", rng)
    ids = tokens(rng, (1, 12))
    cache = RotorqCache(model, attach=False)
    with pytest.raises(RuntimeError, match="set_attn_implementation"), torch.no_grad():
        model(ids, **{CACHE: cache})
    cache = RotorqCache(model)
    assert model.config._attn_implementation == "rotorq"
    with pytest.raises(RuntimeError, match="no_grad"):
        model(ids, **{CACHE: cache})
    cache.reset()
    with torch.no_grad():
        model(ids, **{CACHE: cache})
        with pytest.raises(ValueError, match=r"holds 1 sequences, got a batch of 2"):
            model(tokens(rng, (2, 1)), **{CACHE: cache})


def test_a_mask_that_is_not_causal_over_real_tokens_is_refused(rng):
    """A custom 4D mask hiding a cached real token cannot be honoured on the codes: refused,
    and the cache asks for a reset."""
    model = make("llama", rng)
    ids = tokens(rng, (1, 21))
    cache = RotorqCache(model, **EIGHT_BITS)
    with torch.no_grad():
        model(ids[:, :20], **{CACHE: cache})
        mask = torch.ones((1, 1, 1, 21), dtype=torch.bool)
        mask[..., 3] = False
        with pytest.raises(NotImplementedError, match="not causal attention"):
            model(ids[:, 20:], attention_mask=mask, **{CACHE: cache})
        with pytest.raises(RuntimeError, match="reset"):
            model(ids[:, 20:], **{CACHE: cache})
        cache.reset()
        model(ids[:, :20], **{CACHE: cache})
        model(ids[:, 20:], attention_mask=torch.ones((1, 1, 1, 21), dtype=torch.bool),
              **{CACHE: cache})
    assert cache.get_seq_length() == 21


def test_bfloat16_model(rng):
    model = make("llama", rng).to(torch.bfloat16)
    ids = tokens(rng, (1, 40))
    ref = reference(model, ids).float()
    cache = RotorqCache(model, **EIGHT_BITS)
    got = teacher_forced(model, cache, ids).float()
    assert got.dtype == torch.float32 and cache.layers[0].kv_caches[0].compressed_tokens > 0
    rms, worst = errors(got, ref)
    assert rms <= 2 * RMS_TOL, (rms, worst)  # bfloat16 rounding on both sides


def test_from_a_config_with_the_one_line(rng):
    """Built from a config, the cache leaves the model alone; one documented line enables it."""
    model = make("llama", rng)
    ids = tokens(rng, (1, 12))
    cache = RotorqCache(model.config, **EIGHT_BITS)
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("rotorq")
    with torch.no_grad():
        model(ids, **{CACHE: cache})
    assert [len(kv) for kv in cache.layers[1].kv_caches] == [12]


def test_import_rotorq_stays_free_of_torch():
    code = ("import sys, rotorq, rotorq.integrations; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rotorq_attention_is_sdpa_for_other_caches(rng):
    """With the implementation switched to 'rotorq', a DynamicCache (or no cache) gives
    SDPA's logits."""
    model = make("llama", rng)
    ids = tokens(rng, (2, 20))
    with torch.no_grad():
        ref = model(ids).logits
        RotorqCache(model)
        assert torch.equal(model(ids).logits, ref)
        assert torch.equal(model(ids, **{CACHE: DynamicCache(config=model.config)}).logits, ref)


def test_bad_kv_keywords_fail_at_construction(rng):
    model = make("llama", rng)
    with pytest.raises(TypeError):
        RotorqCache(model, not_a_keyword=1)
    with pytest.raises((TypeError, ValueError)):
        RotorqCache(model, key_bits=0)
    with pytest.raises(ValueError, match="rope_base"):
        RotorqCache(model, rope_base=-1.0)
    cache = RotorqCache(model, key_offset=False)
    assert cache.rope_bases == (None, None)
    assert RotorqCache(model, rope_base=None).rope_bases == (None, None)


def test_bad_inputs(rng):
    """Wrong shapes, NaN keys and empty updates, through update and the attention function
    as a model calls them."""
    from types import SimpleNamespace

    from rotorq.integrations.transformers import rotorq_attention

    with pytest.raises(TypeError, match="transformers model or config"):
        RotorqCache(42)
    model = make("llama", rng)
    cache = RotorqCache(model, **EIGHT_BITS)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    x = torch.as_tensor(rng.standard_normal((1, 2, 5, 32)), dtype=torch.float32)
    q = torch.as_tensor(rng.standard_normal((1, 4, 5, 32)), dtype=torch.float32)
    with pytest.raises(ValueError, match="expected"):
        cache.update(x[:, :1], x[:, :1], 0)  # one KV head, the config says 2
    with pytest.raises(ValueError, match="differ in shape"):
        cache.update(x, x[:, :, :4], 0)
    k, v = cache.update(x[:, :, :0], x[:, :, :0], 0)  # no tokens
    out, _ = rotorq_attention(module, q[:, :, :0], k, v, None, scaling=0.2)
    assert out.shape == (1, 0, 4, 32) and cache.get_seq_length(0) == 0
    k, v = cache.update(x, x, 0)
    out, _ = rotorq_attention(module, q, k, v, None, scaling=0.2)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, x.repeat_interleave(2, 1), x.repeat_interleave(2, 1), is_causal=True, scale=0.2)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
    bad = x[:, :, :1].clone()
    bad[0, 0, 0, 0] = float("nan")
    k, v = cache.update(bad, bad, 0)
    with pytest.raises(ValueError, match="NaN"):
        rotorq_attention(module, q[:, :, :1], k, v, None, scaling=0.2)
    with pytest.raises(RuntimeError, match="reset"):
        cache.update(x[:, :, :1], x[:, :, :1], 0)
    cache.reset()
    k, v = cache.update(x, x, 0)
    rotorq_attention(module, q, k.clone(), v, None)  # a copy lost the tag: plain SDPA ran,
    with pytest.raises(RuntimeError, match="never stored"):  # so nothing was stored
        cache.update(x, x, 0)


def _refused(config, match):
    with pytest.raises(NotImplementedError, match=match):
        read(config)


def test_unsupported_configs_are_refused():
    from transformers import BartConfig, DeepseekV3Config, Gemma2Config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _refused(DeepseekV3Config(num_hidden_layers=2), "latent")
        _refused(BartConfig(), "encoder-decoder")
        _refused(Gemma2Config(num_hidden_layers=2), "soft-caps")
        _refused(Gemma3TextConfig(num_hidden_layers=2, use_bidirectional_attention=True),
                 "bidirectional")
    hybrid = Qwen2Config(num_hidden_layers=2, **COMMON)
    hybrid.layer_types = ["full_attention", "linear_attention"]
    _refused(hybrid, "linear_attention")
    sliding = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, max_window_layers=0,
                          **COMMON)
    assert [layer.window for layer in read(sliding).layers] == [4096, 4096]
    with pytest.raises(NotImplementedError, match="nothing to compress"):
        RotorqCache(sliding)


def test_config_reading():
    spec = read(Qwen2Config(num_hidden_layers=3, use_sliding_window=True, max_window_layers=1,
                            sliding_window=64, rope_theta=1e6, **COMMON))
    assert (spec.num_kv_heads, spec.head_dim) == (2, 32)
    assert [(s.layer_type, s.window, s.rope_base) for s in spec.layers] == [
        ("full_attention", None, 1e6), ("sliding_attention", 64, 1e6),
        ("sliding_attention", 64, 1e6)]
    linear = LlamaConfig(num_hidden_layers=1, rope_scaling={"rope_type": "linear", "factor": 4.0},
                         **COMMON)
    assert read(linear).layers[0].rope_base is None
    llama3 = LlamaConfig(num_hidden_layers=1, rope_theta=5e5, **COMMON,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    assert read(llama3).layers[0].rope_base == 5e5
    no_heads = LlamaConfig(num_hidden_layers=1, **COMMON)
    no_heads.num_key_value_heads = 3
    with pytest.raises(ValueError, match="multiple"):
        read(no_heads)
    assert np.isclose(read(gemma3().config).layers[1].rope_base, 1e6)
