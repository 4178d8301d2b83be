"""Write ``tests/data/smollm2_kv.npz``: real SmolLM2-135M attention q/k/v for the tests.

Run from the repository root with ``python -m benchmarks.tools.make_fixture`` (or
``python3 -m benchmarks.tools.make_fixture``); it needs the packages that
:mod:`benchmarks.cpu.smollm2` lists.

The file holds, for the layers in ``LAYERS`` and the first ``N_TOKENS`` tokens of
the GPL-3 text:

``q``
    float16 ``(n_layers, n_heads, n_tokens, head_dim)``, post-RoPE queries.
``k``, ``v``
    float16 ``(n_layers, n_kv_heads, n_tokens, head_dim)``, post-RoPE keys and values.
``tokens``
    int32 ``(n_tokens,)``, the token ids.
``layers``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``rope_base``
    Metadata; ``rope_style`` is ``"rotate_half"`` (RoPE pairs channels ``i`` and
    ``i + head_dim // 2``) and ``source`` names the model and text.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.cpu import smollm2

LAYERS = (0, 1, 15, 29)
N_TOKENS = 256
FIXTURE = Path(__file__).resolve().parents[2] / "tests" / "data" / "smollm2_kv.npz"


def make_fixture(path: Path = FIXTURE) -> Path:
    """Run the model over GPL-3 and save the q/k/v of ``LAYERS`` to ``path``.

    Parameters
    ----------
    path : pathlib.Path, optional
        Output file; default ``tests/data/smollm2_kv.npz`` in the repository.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    model = smollm2.load_model()
    cfg = model.config
    tokens = smollm2.tokenize(smollm2.load_text("gpl3"))[:N_TOKENS]
    _, captured = smollm2.forward(model, tokens, capture=True)
    layers = list(LAYERS)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        q=captured["q"][layers].astype(np.float16),
        k=captured["k"][layers].astype(np.float16),
        v=captured["v"][layers].astype(np.float16),
        tokens=tokens.astype(np.int32),
        layers=np.array(layers, dtype=np.int32),
        n_heads=np.int32(cfg.n_heads),
        n_kv_heads=np.int32(cfg.n_kv_heads),
        head_dim=np.int32(cfg.head_dim),
        rope_base=np.float64(cfg.rope_base),
        rope_style=np.array("rotate_half"),
        source=np.array(f"{smollm2.GGUF_NAME}, first {len(tokens)} tokens of GPL-3"),
    )
    return path


if __name__ == "__main__":
    written = make_fixture()
    print(f"wrote {written} ({written.stat().st_size / 1e6:.2f} MB)")
