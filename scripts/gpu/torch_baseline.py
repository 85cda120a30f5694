#!/usr/bin/env python3
"""The PyTorch side of the GPU benchmark: memory bandwidth, and transformers `generate` with random
weights at a config's shapes, so candela's numbers have a ceiling and a peer from the same run.

Usage (on the GPU machine, which has torch + transformers):
    python3 scripts/gpu/torch_baseline.py --config models/configs/llama-3.1-8b.json \
        --batch 1 8 32 128 --input-len 1024 --output-len 128 --out result.json

Prints one JSON object and writes it to --out:
  read_gbps       HBM read bandwidth (a reduction over a 4 GiB tensor, best of 5)
  copy_gbps       device-to-device copy (bytes read + written per second)
  weight_bytes    bytes of the model's weights in --dtype
  ceiling_tok_s   single-stream decode ceiling: read_gbps / weight bytes per token
  generate        per batch size: output tokens/s of transformers' greedy generate
"""
import argparse
import json
import time

import torch

# torch.OutOfMemoryError is recent; older releases only have the CUDA one.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device, gib=4, repeats=5):
    n = int(gib * (1 << 30)) // 2
    x = torch.ones(n, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    sync(device)
    best_read = best_copy = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(device)
        best_read = min(best_read, time.perf_counter() - t0)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best_copy = min(best_copy, time.perf_counter() - t0)
    nbytes = x.numel() * x.element_size()
    del x, y
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return nbytes / best_read / 1e9, 2 * nbytes / best_copy / 1e9


def generate_throughput(model, vocab, batch, input_len, output_len, device):
    ids = torch.randint(0, vocab, (batch, input_len), device=device)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                  do_sample=False, pad_token_id=0)
    warm = {**kwargs, "attention_mask": mask[:, :16], "max_new_tokens": 4, "min_new_tokens": 4}
    model.generate(ids[:, :16], **warm)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    sync(device)
    dt = time.perf_counter() - t0
    generated = (out.shape[1] - input_len) * batch
    return {"batch": batch, "seconds": dt, "output_tokens": generated,
            "output_tok_s": generated / dt}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a Hugging Face config.json")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--out", default="")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to try the script out")
    ap.add_argument("--bandwidth-gib", type=float, default=4, help="size of the bandwidth test")
    args = ap.parse_args()

    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    read_gbps, copy_gbps = bandwidth(device, args.bandwidth_gib)
    with open(args.config) as f:
        config = AutoConfig.for_model(**json.load(f))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "config": args.config,
        "dtype": args.dtype,
        "read_gbps": read_gbps,
        "copy_gbps": copy_gbps,
        "weight_bytes": weight_bytes,
        "ceiling_tok_s": read_gbps * 1e9 / weight_bytes,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "generate": [],
    }

    def save():
        # After each measurement, so that a run stopped at its time limit keeps what it measured.
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    save()
    with torch.inference_mode():
        for b in args.batch:
            try:
                r = generate_throughput(model, config.vocab_size, b, args.input_len,
                                        args.output_len, device)
            except OUT_OF_MEMORY as e:
                r = {"batch": b, "error": f"out of memory: {e}"[:200]}
                torch.cuda.empty_cache()
            result["generate"].append(r)
            save()
            print(json.dumps(r), flush=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
