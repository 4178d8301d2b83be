"""Hugging Face transformers integration: :class:`RotorqCache`, a cache whose decode
attention runs on the compressed codes of :class:`rotorq.KVCache`.

``pip install "rotorq[transformers]"`` (transformers 5.x and torch). Importing this module
registers the attention implementation ``"rotorq"`` with transformers'
``AttentionInterface`` (and its mask builder, the SDPA one, with
``AttentionMaskInterface``). ``RotorqCache(model)`` switches the model to it
(``model.set_attn_implementation("rotorq")``; ``attach=False`` leaves that one line to the
caller). With any other cache, or none, the ``"rotorq"`` implementation is
transformers' ``"sdpa"``.

How a forward pass goes through the cache:

- Full-attention layers are compressed, one :class:`rotorq.KVCache` per sequence and layer,
  holding the sequence's real tokens (left padding is skipped, so cache position ``i`` is
  the sequence's ``i``-th real token, which is what the RoPE-aware key offset assumes).
- A layer's first tokens (the prefill) are attended exactly, with SDPA over their own keys
  and values and transformers' mask; they then enter the compressed cache.
- Every later forward pass (one decode step, or several tokens at once) appends its tokens
  and attends with :meth:`rotorq.KVCache.attend` on the codes (``causal=True``).
- Sliding-window and chunked-attention layers (Gemma 3's local layers, Qwen2 with
  ``use_sliding_window``) keep their last ``window`` tokens exact, as transformers'
  ``DynamicSlidingWindowLayer`` does: ``KVCache`` attends over all its tokens and cannot
  drop old ones, and a bounded window costs little memory.

Torch tensors cross into rotorq through DLPack, on the CPU and on CUDA (where KVCache runs
its CUDA kernels on torch's current stream). No gradient flows through the cache: run the
model under ``torch.no_grad()`` or ``torch.inference_mode()`` (``generate`` does).
"""

from __future__ import annotations

try:
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, DynamicSlidingWindowLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("rotorq.integrations.transformers needs torch and transformers 5.x: "
                      'pip install "rotorq[transformers]"') from exc

if int(transformers.__version__.split(".")[0]) != 5:  # pragma: no cover
    raise ImportError(f"rotorq.integrations.transformers supports transformers 5.x, found "
                      f"{transformers.__version__}")

from ..kv import KVCache
from . import _hf_config
from ._hf_layer import ATTENTION, TAG, RotorqLayer
from ._hf_mask import RealTokens


def rotorq_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                     **kwargs):
    """The ``"rotorq"`` attention implementation.

    Keys returned by a :class:`RotorqCache` layer's ``update`` are attended by that layer
    (exactly for its first tokens, on the codes after); any other keys go to transformers'
    ``sdpa_attention_forward`` unchanged.

    Parameters
    ----------
    module : torch.nn.Module
        The attention module (``num_key_value_groups``, ``is_causal``, ``training``).
    query : torch.Tensor, (batch, heads, q, head_dim)
    key, value : torch.Tensor, (batch, kv_heads, kv, head_dim)
    attention_mask : torch.Tensor or None
        4D boolean or additive mask, or None (causal, no padding).
    dropout, scaling : float
        As transformers passes them (``scaling`` None: ``1/√head_dim``).

    Returns
    -------
    (torch.Tensor, None)
        Attention output ``(batch, q, heads, head_dim)`` in the query's dtype; no weights.

    Examples
    --------
    >>> import torch
    >>> from types import SimpleNamespace
    >>> q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    >>> module = SimpleNamespace(num_key_value_groups=2, is_causal=True, training=False)
    >>> out, _ = rotorq_attention(module, q, k, v, None, scaling=0.5)   # no RotorqCache: SDPA
    >>> out.shape
    torch.Size([1, 3, 4, 8])
    """
    layer = getattr(key, TAG, None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    return layer.attention(module, query, key, value, attention_mask, dropout=dropout,
                           scaling=scaling, **kwargs)


AttentionInterface.register(ATTENTION, rotorq_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class RotorqCache(Cache):
    """A transformers cache that stores keys and values with :class:`rotorq.KVCache` and
    attends on the codes when decoding.

    Parameters
    ----------
    model : transformers.PreTrainedModel or transformers.PretrainedConfig
        The model (its config gives the layers, KV heads, head_dim and each layer's RoPE
        base). With a config, the caller runs ``model.set_attn_implementation("rotorq")``.
    key_bits, value_bits : int
        Bits per stored coordinate of the compressed keys and values (KVCache's defaults).
    attach : bool
        Switch ``model`` to the ``"rotorq"`` attention implementation now (default). It
        acts as ``"sdpa"`` for every other cache, so the model keeps working without this
        one; a model that was not on ``"sdpa"`` (eager, flash) changes to it.
    **kv_kwargs
        Any other :class:`rotorq.KVCache` keyword (``residual_tokens``, ``sink_tokens``,
        ``seed``, ...), used for every compressed layer. ``rope_base`` defaults to each
        layer's RoPE base from the config (``rope_parameters`` / ``rope_theta``, per layer
        type); None where the config's RoPE is not plain (partial rotary, linear or
        long-RoPE scaling, multimodal RoPE): the key offset is then one post-RoPE vector.
        Give ``rope_base`` to use one value (or None) for every layer.

    Attributes
    ----------
    rope_bases : tuple
        The ``rope_base`` of each layer's caches (None for exact sliding-window layers).
    compressed_layers : tuple of int
        Indices of the compressed (full-attention) layers.

    Raises
    ------
    TypeError
        ``model`` is neither a transformers model nor a config.
    NotImplementedError
        Models the cache cannot serve (:func:`rotorq.integrations._hf_config.read`: MLA,
        cross-attention, soft-capped logits, bidirectional attention, linear-attention or
        KV-sharing layers, no full-attention layer), and models whose attention does not
        go through transformers' ``AttentionInterface``.
    TypeError, ValueError
        Invalid KVCache keywords (checked here, before any token).

    Notes
    -----
    The cache layer API: ``update``, ``get_seq_length`` (positions, padding included),
    ``get_mask_sizes``, ``reset`` work; ``crop`` removes nothing but accepts ``crop(0)``;
    ``reorder_cache`` and ``batch_select_indices`` permute or drop sequences, and refuse to
    duplicate one (beam search), as does ``batch_repeat_interleave`` on a filled cache:
    ``KVCache`` cannot copy or truncate a compressed sequence (``NotImplementedError``).
    ``torch.compile`` and offloading are not supported.

    Each KVCache holds a sequence's first ``sink_tokens + offset_tokens`` tokens (129 by
    default) in float32 until its key offset is fitted, so a short sequence is stored
    exactly and compressed once it is longer (see :class:`rotorq.KVCache`). ``generate``
    refuses a cache object when the model's generation config names a
    ``cache_implementation``: set it to None first.

    Examples
    --------
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from rotorq.integrations.transformers import RotorqCache
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
    ...                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(config).eval()
    >>> cache = RotorqCache(model, key_bits=4, value_bits=3)
    >>> ids = torch.randint(0, 128, (1, 20))
    >>> out = model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False)
    >>> out.shape, cache.get_seq_length()
    (torch.Size([1, 24]), 23)
    >>> round(cache.bits_per_coordinate, 1)   # 23 tokens: all still held in float32
    32.0
    """

    def __init__(self, model, key_bits=4, value_bits=3, *, attach=True, **kv_kwargs):
        config = model if not hasattr(model, "config") else model.config
        if not hasattr(config, "get_text_config"):
            raise TypeError(f"model must be a transformers model or config, got "
                            f"{type(model).__name__}")
        spec = _hf_config.read(config)
        self.text_config = config.get_text_config(decoder=True)
        if not any(layer.window is None for layer in spec.layers):
            raise NotImplementedError("RotorqCache cannot serve this model: every layer is a "
                                      "sliding-window layer, kept exact; nothing to compress")
        kv_kwargs = dict(kv_kwargs, key_bits=key_bits, value_bits=value_bits)
        user_base = "rope_base" in kv_kwargs
        bases = []
        for layer in spec.layers:
            if layer.window is not None:
                bases.append(None)
            elif user_base:
                bases.append(kv_kwargs["rope_base"])
            else:
                bases.append(layer.rope_base if kv_kwargs.get("key_offset", True) else None)
        for base in set(bases):  # bad keywords fail here, not at the first token
            KVCache(spec.num_kv_heads, spec.head_dim, **dict(kv_kwargs, rope_base=base))
        layers = []
        for i, (layer, base) in enumerate(zip(spec.layers, bases, strict=True)):
            if layer.window is None:
                layers.append(RotorqLayer(self, i, spec.num_kv_heads, spec.head_dim,
                                          dict(kv_kwargs, rope_base=base)))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=layer.window))
        super().__init__(layers=layers)
        self.num_kv_heads = spec.num_kv_heads
        self.head_dim = spec.head_dim
        self.key_bits, self.value_bits = key_bits, value_bits
        self.rope_bases = tuple(bases)
        self.compressed_layers = tuple(i for i, layer in enumerate(spec.layers)
                                       if layer.window is None)
        self.real_tokens = RealTokens()
        if attach and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(ATTENTION)
            if self.text_config._attn_implementation != ATTENTION:
                raise NotImplementedError(
                    f"{type(model).__name__} does not let transformers set its attention "
                    "implementation (its attention does not go through AttentionInterface)")

    def __repr__(self):
        return (f"RotorqCache(layers={len(self.layers)}, compressed={len(self.compressed_layers)}, "
                f"key_bits={self.key_bits}, value_bits={self.value_bits}, "
                f"positions={self.get_seq_length(self.compressed_layers[0])}, nbytes={self.nbytes})")

    def _compressed(self):
        return [layer for layer in self.layers if isinstance(layer, RotorqLayer)]

    # -- sizes ------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes held over all layers: each KVCache's ``nbytes`` (codes, norms, window,
        sinks, key offset) plus the exact keys and values of sliding-window layers."""
        n = 0
        for layer in self.layers:
            if isinstance(layer, RotorqLayer):
                n += layer.nbytes
            elif layer.is_initialized and layer.keys is not None:
                n += layer.keys.numel() * layer.keys.element_size()
                n += layer.values.numel() * layer.values.element_size()
        return n

    @property
    def bits_per_coordinate(self) -> float:
        """``8 · nbytes`` per stored coordinate, over all layers (0.0 when empty)."""
        coords = 0
        for layer in self.layers:
            if isinstance(layer, RotorqLayer):
                coords += layer.coordinates
            elif layer.is_initialized and layer.keys is not None:
                coords += layer.keys.numel() + layer.values.numel()
        return 8.0 * self.nbytes / coords if coords else 0.0

    # -- whole-cache operations: checked on every layer before any layer changes -------
    def reset(self):
        super().reset()
        self.real_tokens.reset()

    def crop(self, tokens_to_remove):
        for layer in self._compressed():
            layer.crop(tokens_to_remove)
        super().crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats):
        for layer in self._compressed():
            layer.batch_repeat_interleave(repeats)
        super().batch_repeat_interleave(repeats)

    def _select(self, indices, action):
        layers = self._compressed()
        if not layers[0].kv_caches:  # nothing stored yet: the batch is set by the first tokens
            return
        index = layers[0].index_list(indices)
        layers[0].can_select(index, action)
        for layer in self.layers:
            if isinstance(layer, RotorqLayer):
                layer.select(index)
            elif action == "reorder_cache":
                layer.reorder_cache(torch.as_tensor(index, dtype=torch.long))
            else:
                layer.batch_select_indices(torch.as_tensor(index, dtype=torch.long))
        self.real_tokens.select(index)

    def reorder_cache(self, beam_idx):
        self._select(beam_idx, "reorder_cache")

    def batch_select_indices(self, indices):
        self._select(indices, "batch_select_indices")


__all__ = ["RotorqCache", "rotorq_attention"]
