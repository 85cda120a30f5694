#!/usr/bin/env python3
"""candela against mistral.rs (its PyPI wheel, `pip install mistralrs openai`) on the same GGUF,
the same chat prompts, greedy, 128 generated tokens each, in one run.

    python3 scripts/peers/mistralrs_vs_candela.py --gguf PATH.gguf --base-url http://127.0.0.1:8080

candela is called over HTTP (a running `candela serve --anonymous-rpm 0`) with the OpenAI SDK;
mistral.rs in-process through its Python `Runner` (no HTTP, which favours it). Reports single-stream
tokens/s (end to end, prefill included) for both, and 16 concurrent streams where the peer can:
its Runner refuses calls from several threads ("Already borrowed"), which is reported as such.
"""
import argparse
import concurrent.futures as cf
import os
import time

PROMPT = "Write a long story about a dragon who learns to fly."
TOKENS = 128


def timed(fn):
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def candela(base_url, model, runs, concurrency):
    from openai import OpenAI

    client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="unused", max_retries=0)

    def one(prompt=PROMPT, n=TOKENS):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=n,
            temperature=0, extra_body={"ignore_eos": True})
        return r.usage.completion_tokens

    one("warm up", 8)
    single = [n / dt for n, dt in (timed(one) for _ in range(runs))]
    with cf.ThreadPoolExecutor(concurrency) as ex:
        total, dt = timed(lambda: sum(ex.map(lambda i: one(f"Story {i}: {PROMPT}"), range(concurrency))))
    return single, total / dt


def mistralrs(gguf, runs, concurrency):
    from mistralrs import ChatCompletionRequest, Runner, Which

    runner = Runner(which=Which.GGUF(quantized_model_id=os.path.dirname(os.path.abspath(gguf)),
                                     quantized_filename=os.path.basename(gguf)),
                    token_source="none", no_paged_attn=True)

    def one(prompt=PROMPT, n=TOKENS):
        r = runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=[{"role": "user", "content": prompt}], max_tokens=n,
            temperature=0.0))
        return r.usage.completion_tokens

    one("warm up", 8)
    single = [n / dt for n, dt in (timed(one) for _ in range(runs))]
    try:
        with cf.ThreadPoolExecutor(concurrency) as ex:
            total, dt = timed(lambda: sum(ex.map(lambda i: one(f"Story {i}: {PROMPT}"), range(concurrency))))
        aggregate = total / dt
    except RuntimeError as e:
        aggregate = f"failed: {e}"
    return single, aggregate


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    c_single, c_agg = candela(args.base_url, args.model, args.runs, args.concurrency)
    m_single, m_agg = mistralrs(args.gguf, args.runs, args.concurrency)
    fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)
    print(f"single stream tok/s   candela {fmt(c_single)}   mistral.rs {fmt(m_single)}   "
          f"ratio {max(c_single) / max(m_single):.1f}x (best runs)")
    agg = m_agg if isinstance(m_agg, str) else f"{m_agg:.1f}"
    print(f"{args.concurrency} concurrent tok/s   candela {c_agg:.1f}   mistral.rs {agg}")


if __name__ == "__main__":
    main()
