"""What a transformers model config says about its attention layers, for
:class:`rotorq.integrations.transformers.RotorqCache`: the KV heads, head_dim, each layer's
kind (compressed full attention, or an exact sliding/chunked window) and RoPE base, and
the architectures the cache cannot serve, refused with the reason.

Only plain Python here (no torch): a config is read through its attributes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# RoPE types whose high frequencies are the plain ``rope_theta`` ones (the scaled variants
# only stretch the low frequencies or rescale cos/sin): the base is a good model of them.
_ROPE_TYPES_WITH_BASE = ("default", "llama3", "yarn", "dynamic")
FULL = ("full_attention",)
WINDOWED = ("sliding_attention", "chunked_attention")


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer as the cache serves it.

    Attributes
    ----------
    layer_type : str
        The config's layer type (``"full_attention"``, ``"sliding_attention"``, ...).
    window : int or None
        Sliding window (or attention chunk) of a windowed layer, kept exact; None for a
        full-attention layer, compressed.
    rope_base : float or None
        RoPE frequency base of the layer's type, when the layer uses plain rotate-half RoPE
        on every channel with that base (or a scaling that keeps its high frequencies);
        else None.
    """

    layer_type: str
    window: int | None
    rope_base: float | None


@dataclass(frozen=True)
class ModelSpec:
    """The attention shape of a decoder: KV heads, head_dim and one spec per layer."""

    num_kv_heads: int
    head_dim: int
    layers: tuple[LayerSpec, ...]


def _positive(config, name):
    value = getattr(config, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def _refuse(reason):
    raise NotImplementedError(f"RotorqCache cannot serve this model: {reason}")


def _layer_types(config, n_layers):
    """The layer types as transformers' own caches read them (``DynamicCache``)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # an older 5.x: the same rule, read by hand
        get_layer_types_and_kwargs = None
    if get_layer_types_and_kwargs is not None:
        types, _ = get_layer_types_and_kwargs(config)
        return list(types)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    if getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * n_layers
    if getattr(config, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n_layers
    return ["full_attention"] * n_layers


def rope_base(config, layer_type):
    """RoPE base of ``layer_type``'s layers, or None when the base alone does not describe
    their rotation (partial rotary, multimodal RoPE, linear or long-RoPE scaling).

    ``rope_parameters`` may be one dict or one per layer type (Gemma 3: local and global
    layers); older configs give ``rope_theta`` and ``rope_scaling``.

    Examples
    --------
    >>> from types import SimpleNamespace as C
    >>> rope_base(C(rope_parameters={"rope_theta": 1e4, "rope_type": "default"}), "full_attention")
    10000.0
    >>> per_type = {"sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
    ...             "full_attention": {"rope_theta": 1e6, "rope_type": "default"}}
    >>> rope_base(C(rope_parameters=per_type), "full_attention")
    1000000.0
    >>> rope_base(C(rope_parameters={"rope_theta": 1e4, "rope_type": "linear", "factor": 8.0}),
    ...           "full_attention") is None
    True
    """
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if not isinstance(params, dict):
        scaling = getattr(config, "rope_scaling", None) or {}
        params = dict(scaling, rope_theta=getattr(config, "rope_theta", None))
    theta = params.get("rope_theta")
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if (isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta)
            or theta <= 1 or kind not in _ROPE_TYPES_WITH_BASE or "mrope_section" in params
            or partial not in (None, 1, 1.0)):
        return None
    return float(theta)


def read(config) -> ModelSpec:
    """Read a model config; refuse what the cache cannot serve.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config (a multimodal model's decoder text config is used).

    Returns
    -------
    ModelSpec

    Raises
    ------
    NotImplementedError
        Encoder-decoder models and cross-attention, multi-head latent attention (MLA,
        ``kv_lora_rank``), attention-logit soft-capping, bidirectional attention, and
        layer types other than full, sliding-window and chunked attention (linear
        attention, KV sharing, ...), each named in the message.
    ValueError
        A config without KV heads or head_dim, or whose heads are not a multiple of the
        KV heads.

    Examples
    --------
    >>> from transformers import LlamaConfig
    >>> spec = read(LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
    ...                         num_key_value_heads=2, rope_theta=5e5))
    >>> spec.num_kv_heads, spec.head_dim, spec.layers[0]
    (2, 16, LayerSpec(layer_type='full_attention', window=None, rope_base=500000.0))
    """
    if getattr(config, "is_encoder_decoder", False):
        _refuse("it is an encoder-decoder model (cross-attention over encoder states is not a "
                "decode-time KV cache); decoder-only models are supported")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False) or getattr(text, "add_cross_attention", False):
        _refuse("its decoder has cross-attention layers")
    if getattr(text, "kv_lora_rank", None) is not None:
        _refuse("it uses multi-head latent attention (kv_lora_rank: DeepSeek-V2/V3 style MLA), "
                "whose cache holds a latent vector, not per-head keys and values")
    if getattr(text, "attn_logit_softcapping", None) is not None:
        _refuse("it soft-caps attention logits (attn_logit_softcapping); attention on the codes "
                "computes a plain softmax")
    if getattr(text, "use_bidirectional_attention", False) or not getattr(text, "is_causal", True):
        _refuse("its attention is bidirectional; the cache serves causal decoders")
    n_layers = _positive(text, "num_hidden_layers")
    heads = _positive(text, "num_attention_heads")
    if n_layers is None or heads is None:
        raise ValueError("the model config has no positive num_hidden_layers / "
                         "num_attention_heads")
    kv_heads = _positive(text, "num_key_value_heads") or heads
    head_dim = _positive(text, "head_dim")
    if head_dim is None:
        hidden = _positive(text, "hidden_size")
        if hidden is None or hidden % heads:
            raise ValueError("the model config has no head_dim and hidden_size is not a "
                             "multiple of num_attention_heads")
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    types = _layer_types(text, n_layers)
    if len(types) != n_layers:
        raise ValueError(f"the config lists {len(types)} layer types for {n_layers} layers")
    other = sorted(set(types) - set(FULL) - set(WINDOWED))
    if other:
        _refuse(f"it has layers of type {other}; supported: full attention (compressed) and "
                f"sliding-window/chunked attention (kept exact)")
    layers = []
    for layer_type in types:
        window = None
        if layer_type == "sliding_attention":
            window = _positive(text, "sliding_window")
        elif layer_type == "chunked_attention":
            window = _positive(text, "attention_chunk_size")
        if layer_type in WINDOWED and window is None:
            raise ValueError(f"a {layer_type} layer without a positive window size in the config")
        layers.append(LayerSpec(layer_type, window, rope_base(text, layer_type)))
    return ModelSpec(kv_heads, head_dim, tuple(layers))
