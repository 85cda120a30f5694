#!/usr/bin/env python3
"""A small streaming load test for any OpenAI-compatible server (candela, llama.cpp's server, vLLM).

Sends N concurrent chat requests with a fixed number of output tokens (ignore_eos) and reports
time to first token (prefill), per-stream decode rate and aggregate output throughput.
Stand-in until `candela bench` exists.

    python3 scripts/quick_bench.py --base-url http://127.0.0.1:8080 --model smollm2-135m-instruct \
        --concurrency 1 16 --output-len 128 --prompt-words 100
"""
import argparse
import json
import statistics
import threading
import time
import urllib.request
import uuid

RUN_ID = ""
WORDS = ("river mountain lantern copper orchard violet harbor meadow thunder basket quiet "
         "silver garden window engine marble pepper candle forest ribbon").split()


def prompt(i, n_words):
    # A unique opening per request, so that no run is served from a prefix cache.
    return f"{RUN_ID}-{i}. Summarise these words: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))


def one(base, model, i, args, out):
    body = json.dumps({
        "model": model,
        "messages": [{"role": "user", "content": prompt(i, args.prompt_words)}],
        "max_tokens": args.output_len, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", body, {"content-type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    t0 = time.time()
    first = None
    chunks = 0
    usage = None
    with opener.open(req, timeout=600) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for c in ev.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.time()
    end = time.time()
    out[i] = dict(ttft=(first or end) - t0, end=end - t0, usage=usage, chunks=chunks)


def run(base, model, n, args):
    global RUN_ID
    RUN_ID = uuid.uuid4().hex[:8]
    out = {}
    threads = [threading.Thread(target=one, args=(base, model, i, args, out)) for i in range(n)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    comp = sum((r["usage"] or {}).get("completion_tokens", r["chunks"]) for r in out.values())
    prompt_toks = sum((r["usage"] or {}).get("prompt_tokens", 0) for r in out.values())
    ttft = [r["ttft"] for r in out.values()]
    decode = [((r["usage"] or {}).get("completion_tokens", r["chunks"]) - 1) / max(r["end"] - r["ttft"], 1e-9) for r in out.values()]
    return {
        "concurrency": n,
        "prompt_tokens_per_request": prompt_toks / n,
        "mean_ttft_ms": 1000 * statistics.mean(ttft),
        "prefill_tok_s_single": (prompt_toks / n) / statistics.mean(ttft) if n == 1 else None,
        "mean_stream_decode_tok_s": statistics.mean(decode),
        "aggregate_output_tok_s": comp / wall,
        "wall_s": wall,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=1)
    args = ap.parse_args()
    base = args.base_url.rstrip("/").removesuffix("/v1")
    for _ in range(args.warmup):
        run(base, args.model, 1, argparse.Namespace(**{**vars(args), "output_len": 8}))
    for n in args.concurrency:
        print(json.dumps(run(base, args.model, n, args)))


if __name__ == "__main__":
    main()
