"""One compressed full-attention layer of
:class:`rotorq.integrations.transformers.RotorqCache`: a transformers cache layer
(``CacheLayerMixin``) holding one :class:`rotorq.KVCache` per sequence.

``update`` stages the new keys and values and tags the key tensor it returns with the
layer; the ``"rotorq"`` attention function, which receives that tensor, reads which new
tokens are real from the attention mask, appends them to the sequences' caches, and
attends: exactly (SDPA over the new keys and values) when the layer was empty, else on
the compressed codes. A layer whose attention function did not run (the model's
attention implementation is not ``"rotorq"``) refuses its next update.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..kv import KVCache

TAG = "_rotorq_layer"  # attribute of the key tensor that update() returns
ATTENTION = "rotorq"  # the registered attention implementation


class RotorqLayer(CacheLayerMixin):
    """A full-attention layer's cache: one :class:`rotorq.KVCache` per sequence, holding
    that sequence's real (non-padding) tokens.

    Parameters
    ----------
    owner : RotorqCache
        The cache this layer belongs to (its padding history and attention check).
    layer_idx : int
        Index of the decoder layer.
    num_kv_heads, head_dim : int
        Shape of the layer's keys and values.
    kv_kwargs : dict
        Keyword arguments of every :class:`rotorq.KVCache` (``rope_base`` included).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner, layer_idx, num_kv_heads, head_dim, kv_kwargs):
        super().__init__()
        self._owner = owner
        self.layer_idx = layer_idx
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_kwargs = dict(kv_kwargs)
        self._caches = None
        self._seen = 0
        self._staged = None
        self._broken = None

    def __repr__(self):
        return (f"RotorqLayer(layer_idx={self.layer_idx}, sequences="
                f"{0 if self._caches is None else len(self._caches)}, positions={self._seen})")

    # -- state ------------------------------------------------------------------------
    @property
    def kv_caches(self):
        """The per-sequence :class:`rotorq.KVCache` objects (empty before the first
        tokens)."""
        return () if self._caches is None else tuple(self._caches)

    @property
    def nbytes(self) -> int:
        """Bytes held by the layer's caches (:attr:`rotorq.KVCache.nbytes`, summed)."""
        return sum(c.nbytes for c in self.kv_caches)

    @property
    def coordinates(self) -> int:
        """Stored coordinates: tokens · KV heads · head_dim · 2 (keys and values)."""
        return sum(len(c) for c in self.kv_caches) * self.num_kv_heads * self.head_dim * 2

    def _check_usable(self):
        if self._broken is not None:
            raise RuntimeError(f"layer {self.layer_idx} of the RotorqCache is inconsistent after "
                               f"a failed forward pass ({self._broken}); call cache.reset()")
        if self._staged is not None:
            raise RuntimeError(
                f"layer {self.layer_idx}: the previous update was not followed by the 'rotorq' "
                "attention function, so its tokens were never stored; the model must run with "
                "model.set_attn_implementation('rotorq') (RotorqCache(model) does it), and "
                "nothing may replace the key tensor between cache.update and attention")

    # -- CacheLayerMixin --------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        for name, x in (("keys", key_states), ("values", value_states)):
            if x.ndim != 4 or x.shape[1] != self.num_kv_heads or x.shape[3] != self.head_dim:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} of shape {tuple(x.shape)}, expected (batch, "
                    f"{self.num_kv_heads}, tokens, {self.head_dim}) as the model config says")
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Stage the new keys and values ``(batch, kv_heads, t, head_dim)``; the attention
        function stores them. Returns them, the key tensor tagged with this layer."""
        self._check_usable()
        implementation = self._owner.text_config._attn_implementation
        if implementation != ATTENTION:
            raise RuntimeError(
                f"the model's attention implementation is {implementation!r}; RotorqCache "
                "attends through the 'rotorq' one: model.set_attn_implementation('rotorq')")
        self.lazy_initialization(key_states, value_states)
        if tuple(value_states.shape) != tuple(key_states.shape):
            raise ValueError(f"keys {tuple(key_states.shape)} and values "
                             f"{tuple(value_states.shape)} differ in shape")
        if self._caches is not None and key_states.shape[0] != len(self._caches):
            raise ValueError(f"layer {self.layer_idx} holds {len(self._caches)} sequences, got a "
                             f"batch of {key_states.shape[0]}")
        if key_states.requires_grad or value_states.requires_grad:
            raise RuntimeError("RotorqCache stores keys and values without autograd; run the "
                               "model under torch.no_grad() or torch.inference_mode()")
        self._staged = (key_states, value_states, self._seen)
        self._seen += key_states.shape[-2]
        setattr(key_states, TAG, self)
        return key_states, value_states

    def get_mask_sizes(self, query_length):
        return self._seen + query_length, 0

    def get_seq_length(self):
        """Positions seen, padding included (as ``DynamicLayer`` counts them)."""
        return self._seen

    def get_max_length(self):
        return -1

    def reset(self):
        self._caches = None
        self._seen = 0
        self._staged = None
        self._broken = None
        self.is_initialized = False

    def offload(self):
        raise NotImplementedError("RotorqCache layers are not offloaded (they live where the "
                                  "model's keys are)")

    def prefetch(self):
        raise NotImplementedError("RotorqCache layers are not offloaded")

    def crop(self, tokens_to_remove):
        """Only removing nothing is possible: ``KVCache`` cannot drop stored tokens."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to "
                             "remove")
        if tokens_to_remove < 0 and self._seen > 0:
            raise NotImplementedError(
                f"crop({tokens_to_remove}): compressed tokens cannot be removed (KVCache has no "
                "truncation); assisted and speculative decoding need a croppable cache")

    def batch_repeat_interleave(self, repeats):
        if repeats != 1 and self._seen > 0:
            raise NotImplementedError("repeating sequences of a filled RotorqCache: compressed "
                                      "sequences cannot be copied (KVCache has no copy)")

    def batch_select_indices(self, indices):
        index = self.index_list(indices)
        self.can_select(index, "batch_select_indices")
        self.select(index)

    def reorder_cache(self, beam_idx):
        index = self.index_list(beam_idx)
        self.can_select(index, "reorder_cache")
        self.select(index)

    def index_list(self, indices):
        """``indices`` (ints or a boolean mask, list or tensor) as a list of sequence indices."""
        n = 0 if self._caches is None else len(self._caches)
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu()
        return torch.arange(n)[torch.as_tensor(indices)].tolist() if n else []

    def can_select(self, index, action):
        """Raise unless ``index`` (list of ints) keeps each sequence at most once."""
        if len(set(index)) != len(index):
            raise NotImplementedError(
                f"{action} duplicates sequences ({index}); a compressed sequence cannot be "
                "copied through KVCache's public API (beam search and batch expansion after the "
                "prefill are not supported)")

    def select(self, index):
        """Keep the sequences ``index`` in that order (checked by :meth:`can_select`)."""
        if self._caches is not None:
            self._caches = [self._caches[i] for i in index]

    # -- attention --------------------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, *, dropout=0.0,
                  scaling=None, **kwargs):
        """Store the staged tokens and attend: exact on the layer's first tokens, on the
        codes after. Returns ``(output (batch, q, heads, head_dim), None)``."""
        try:
            delattr(key, TAG)
        except AttributeError:
            pass
        if self._staged is None or self._staged[0] is not key:
            raise RuntimeError(f"layer {self.layer_idx}: attention called with keys that the "
                               "cache's last update did not return")
        keys, values, past = self._staged
        self._staged = None
        try:  # the update already counted these tokens: a failure leaves the layer unusable
            for name in ("sliding_window", "softcap", "s_aux", "position_bias"):
                if kwargs.get(name) is not None:
                    raise NotImplementedError(f"attention with {name}={kwargs[name]!r} on a "
                                              "compressed RotorqCache layer")
            if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
                raise NotImplementedError("non-causal attention on a RotorqCache layer")
            if dropout and module.training:
                raise NotImplementedError("attention dropout (training) on a RotorqCache layer")
            if query.requires_grad:
                raise RuntimeError("RotorqCache attends without autograd; run the model under "
                                   "torch.no_grad() or torch.inference_mode()")
            batch, _, q, _ = keys.shape
            if q == 0:  # nothing to store or attend
                return query.new_zeros((batch, 0, query.shape[1], query.shape[3])), None
            flags = self._owner.real_tokens.flags(attention_mask, batch, past, q)
            first = past == 0
            if first:
                out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                dropout=0.0, scaling=scaling, **kwargs)
            self._store(keys, values, flags)
            if not first:
                out = self._attend(query, flags, scaling)
        except BaseException as exc:
            if self._broken is None:
                self._broken = f"{type(exc).__name__}: {exc}"
            raise
        return out, None

    def _store(self, keys, values, flags):
        if self._caches is None:
            self._caches = [KVCache(self.num_kv_heads, self.head_dim, **self.kv_kwargs)
                            for _ in range(keys.shape[0])]
        for s, cache in enumerate(self._caches):
            row = flags[s]
            if row.all():
                cache.append(keys[s], values[s])
            elif row.any():
                idx = torch.as_tensor(np.flatnonzero(row), device=keys.device)
                cache.append(keys[s].index_select(1, idx), values[s].index_select(1, idx))

    def _attend(self, query, flags, scaling):
        batch, heads, q, d = query.shape
        scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
        if batch == 1 and flags.all():
            out = self._caches[0].attend(query[0], scale=scale, causal=True)
            return out.transpose(0, 1).to(query.dtype).unsqueeze(0)
        out = torch.zeros((batch, q, heads, d), dtype=query.dtype, device=query.device)
        for s, cache in enumerate(self._caches):
            row = flags[s]
            if row.all():
                out[s] = cache.attend(query[s], scale=scale, causal=True).transpose(0, 1)
            elif row.any():  # padded queries get zeros: their outputs are never read
                idx = torch.as_tensor(np.flatnonzero(row), device=query.device)
                res = cache.attend(query[s].index_select(1, idx), scale=scale, causal=True)
                out[s].index_copy_(0, idx, res.transpose(0, 1).to(query.dtype))
        return out
