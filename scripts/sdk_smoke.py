#!/usr/bin/env python3
"""End-to-end smoke test of a running candela server through the official `openai` SDK.

Usage:
    python3 scripts/sdk_smoke.py http://127.0.0.1:PORT [-k SUBSTRING]

Prints one line per check (PASS/FAIL), then a closing line `N passed, N failed`,
and exits 1 if any check failed. `-k` runs only the checks whose name contains
SUBSTRING. Needs: openai, numpy (scripts/test.sh installs both into .venv).
Raw HTTP (malformed bodies, raw base64) goes through urllib so the script does
not depend on which HTTP client the SDK version ships with.
"""
import argparse
import base64
import concurrent.futures
import functools
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
from openai import OpenAI

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
CHAT_CONTEXT = 8192
EMBED_DIMS = 384

MSG = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
LIST_MSG = [{"role": "user", "content": "Name three fruits, one per line, nothing else."}]
LONG_MSG = [{"role": "user", "content": "Write a long story about a dragon who learns to fly."}]
CONCURRENT_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Hi!",
    "Explain in two sentences why the sky is blue, as if talking to a curious ten year old child.",
    "Give me a short list of three tips for staying focused while working from home.",
]
SENTENCES = [
    "A cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue grew by five percent.",
]

BASE = ""
NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is local
client = None  # type: OpenAI
BIN = ""  # the candela binary, for `candela token ...` (--bin)
CHECKS = []


# --------------------------------------------------------------------------- helpers


def check(name):
    def deco(fn):
        CHECKS.append((name, fn))
        return fn

    return deco


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def eq(got, want, what):
    expect(got == want, f"{what}: got {got!r}, want {want!r}")


def http(method, path, body=None, raw=None, timeout=120):
    """Plain HTTP request; returns (status, headers, body bytes) for any status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(BASE + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with NO_PROXY_OPENER.open(req, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def check_error_json(status, raw_body, want_status):
    """OpenAI error JSON: {"error": {"message", "type", "param", "code"}}; returns the inner object."""
    eq(status, want_status, "HTTP status")
    try:
        j = json.loads(raw_body)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {raw_body[:200]!r}")
    expect(isinstance(j, dict) and isinstance(j.get("error"), dict), f"no error object: {j!r}")
    err = j["error"]
    for key in ("message", "type", "param", "code"):
        expect(key in err, f"error JSON lacks {key!r}: {err!r}")
    expect(isinstance(err["message"], str) and err["message"], f"empty error message: {err!r}")
    return err


def sdk_error(exc_type, fn, want_status):
    """Run fn, expect the SDK to raise exc_type with want_status; return the inner error object."""
    try:
        fn()
    except exc_type as e:
        eq(e.status_code, want_status, "status_code")
        return check_error_json(e.status_code, e.response.content, want_status)
    except openai.APIStatusError as e:
        raise AssertionError(f"expected {exc_type.__name__}, got {type(e).__name__} "
                             f"{e.status_code}: {e.response.text[:300]}")
    raise AssertionError(f"expected {exc_type.__name__}, the request succeeded")


def chat(messages=MSG, **kw):
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model=CHAT, messages=messages, **kw)


def stream_chat(messages=MSG, **kw):
    """Streaming chat (single choice): returns (chunks, concatenated content)."""
    kw.setdefault("max_tokens", 16)
    chunks = list(client.chat.completions.create(model=CHAT, messages=messages, stream=True, **kw))
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    return chunks, text


def check_usage(usage, max_completion=None):
    expect(usage is not None, "usage missing")
    expect(usage.prompt_tokens > 0, f"prompt_tokens={usage.prompt_tokens}")
    expect(usage.completion_tokens > 0, f"completion_tokens={usage.completion_tokens}")
    if max_completion is not None:
        expect(usage.completion_tokens <= max_completion,
               f"completion_tokens={usage.completion_tokens} > {max_completion}")
    eq(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens, "total_tokens")


@functools.lru_cache(maxsize=None)
def greedy():
    """The reference greedy chat completion (MSG, temperature 0, max_tokens 16)."""
    return chat(temperature=0, max_tokens=16)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


# --------------------------------------------------------------------------- checks


@check("health")
def _():
    status, _, body = http("GET", "/health")
    eq(status, 200, "status")
    eq(json.loads(body).get("status"), "ok", "/health status field")


@check("models.list: both models with metadata")
def _():
    models = {m.id: m.to_dict() for m in client.models.list().data}
    for mid, mtype in ((CHAT, "chat"), (EMBED, "embedding")):
        expect(mid in models, f"{mid} not listed (got {sorted(models)})")
        m = models[mid]
        eq(m.get("object"), "model", f"{mid}.object")
        expect(isinstance(m.get("created"), int), f"{mid}.created={m.get('created')!r}")
        expect(isinstance(m.get("owned_by"), str) and m["owned_by"], f"{mid}.owned_by={m.get('owned_by')!r}")
        eq(m.get("type"), mtype, f"{mid}.type")
        expect(isinstance(m.get("context_size"), int) and m["context_size"] > 0,
               f"{mid}.context_size={m.get('context_size')!r}")
        expect(m.get("params") is not None, f"{mid}.params missing")
        expect(isinstance(m.get("tags"), list), f"{mid}.tags={m.get('tags')!r}")
    eq(models[CHAT]["context_size"], CHAT_CONTEXT, "chat context_size")
    status, _, body = http("GET", "/v1/models")
    eq(status, 200, "GET /v1/models status")
    eq(json.loads(body).get("object"), "list", "GET /v1/models object")


@check("chat: non-stream greedy basics")
def _():
    r = greedy()
    expect(r.id, "empty id")
    eq(r.object, "chat.completion", "object")
    eq(r.model, CHAT, "model")
    eq(len(r.choices), 1, "len(choices)")
    c = r.choices[0]
    eq(c.index, 0, "choices[0].index")
    eq(c.message.role, "assistant", "role")
    expect(c.message.content, f"empty content: {c.message.content!r}")
    expect(c.finish_reason in ("stop", "length"), f"finish_reason={c.finish_reason!r}")
    check_usage(r.usage, 16)


@check("chat: temperature 0 is deterministic")
def _():
    a = greedy().choices[0].message.content
    b = chat(temperature=0, max_tokens=16).choices[0].message.content
    eq(b, a, "second greedy content")


@check("chat: temperature 0.8 with a fixed seed is reproducible")
def _():
    kw = dict(messages=LONG_MSG, temperature=0.8, seed=1234, max_tokens=24)
    a = chat(**kw).choices[0].message.content
    b = chat(**kw).choices[0].message.content
    expect(a, "empty content")
    eq(b, a, "second seeded content")


@check("chat: stream + include_usage matches non-stream")
def _():
    ref = greedy()
    chunks, text = stream_chat(temperature=0, max_tokens=16, stream_options={"include_usage": True})
    expect(len(chunks) >= 2, f"only {len(chunks)} chunks")
    eq(text, ref.choices[0].message.content, "streamed content")
    for c in chunks:
        eq(c.object, "chat.completion.chunk", "chunk.object")
        eq(c.model, CHAT, "chunk.model")
    eq(len({c.id for c in chunks}), 1, "distinct chunk ids")
    last = chunks[-1]
    eq(last.choices, [], "last chunk choices")
    check_usage(last.usage, 16)
    eq(last.usage.completion_tokens, ref.usage.completion_tokens, "stream completion_tokens")
    eq(last.usage.prompt_tokens, ref.usage.prompt_tokens, "stream prompt_tokens")
    for c in chunks[:-1]:
        expect(c.usage is None, "usage on a non-final chunk")
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    eq(reasons, [ref.choices[0].finish_reason], "finish_reason(s) in stream")


@check("chat: n=2 at temperature 1.0")
def _():
    r = chat(messages=LONG_MSG, n=2, temperature=1.0, max_tokens=16)
    eq(sorted(c.index for c in r.choices), [0, 1], "choice indices")
    for c in r.choices:
        expect(c.message.content, f"choice {c.index} empty")
        expect(c.finish_reason in ("stop", "length"), f"finish_reason={c.finish_reason!r}")
    check_usage(r.usage, 32)
    if all(c.finish_reason == "length" for c in r.choices):
        eq(r.usage.completion_tokens, 32, "completion_tokens (both hit length)")


@check("chat: n=2 usage is the sum over choices (counted via logprobs)")
def _():
    r = chat(messages=LONG_MSG, n=2, temperature=1.0, max_tokens=12, logprobs=True)
    counts = [len(c.logprobs.content) for c in sorted(r.choices, key=lambda c: c.index)]
    eq(r.usage.completion_tokens, sum(counts), f"completion_tokens (per choice {counts})")


@check("chat: stop=['\\n']")
def _():
    r = chat(messages=LIST_MSG, temperature=0, max_tokens=32, stop=["\n"])
    c = r.choices[0]
    expect("\n" not in c.message.content, f"content has a newline: {c.message.content!r}")
    expect(c.finish_reason in ("stop", "length"), f"finish_reason={c.finish_reason!r}")
    _, text = stream_chat(messages=LIST_MSG, temperature=0, max_tokens=32, stop=["\n"])
    eq(text, c.message.content, "streamed content with stop")


@check("chat: max_tokens=1")
def _():
    r = chat(messages=LONG_MSG, temperature=0, max_tokens=1)
    eq(r.choices[0].finish_reason, "length", "finish_reason")
    eq(r.usage.completion_tokens, 1, "completion_tokens")


@check("chat: max_completion_tokens=5")
def _():
    r = client.chat.completions.create(model=CHAT, messages=LONG_MSG, temperature=0, max_completion_tokens=5)
    n, reason = r.usage.completion_tokens, r.choices[0].finish_reason
    expect(0 < n <= 5, f"completion_tokens={n}")
    eq(reason, "length" if n == 5 else "stop", f"finish_reason after {n} tokens")


@check("chat: logprobs with top_logprobs=3")
def _():
    r = chat(temperature=0, max_tokens=16, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    eq(len(content), r.usage.completion_tokens, "len(logprobs.content)")
    for i, t in enumerate(content):
        expect(isinstance(t.token, str), f"token {i} not a string")
        expect(t.logprob <= 0, f"token {i} logprob {t.logprob} > 0")
        eq(len(t.top_logprobs), 3, f"len(top_logprobs) of token {i}")
        tops = [x.logprob for x in t.top_logprobs]
        expect(all(x <= 0 for x in tops), f"token {i} top logprob > 0: {tops}")
        # greedy: the sampled token is the most likely one
        expect(t.logprob >= max(tops) - 1e-3, f"token {i}: logprob {t.logprob} < top {max(tops)}")
    eq(r.choices[0].message.content, greedy().choices[0].message.content, "content with logprobs")


@check("chat: extra_body ignore_eos, max_tokens=40")
def _():
    r = chat(temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    eq(r.usage.completion_tokens, 40, "completion_tokens")
    eq(r.choices[0].finish_reason, "length", "finish_reason")


@check("chat: extra_body top_k=1 equals greedy; min_p/repetition_penalty accepted")
def _():
    r = chat(temperature=1.0, max_tokens=16, extra_body={"top_k": 1})
    eq(r.choices[0].message.content, greedy().choices[0].message.content, "top_k=1 content")
    r = chat(temperature=0.7, max_tokens=8, seed=7, extra_body={"min_p": 0.1, "repetition_penalty": 1.1})
    expect(r.choices[0].message.content, "empty content with min_p/repetition_penalty")


@check("completions (legacy): non-stream and stream")
def _():
    kw = dict(model=CHAT, prompt="The capital of France is", max_tokens=8, temperature=0)
    r = client.completions.create(**kw)
    eq(r.object, "text_completion", "object")
    eq(r.model, CHAT, "model")
    eq(len(r.choices), 1, "len(choices)")
    text = r.choices[0].text
    expect(text, f"empty text: {text!r}")
    expect(r.choices[0].finish_reason in ("stop", "length"), f"finish_reason={r.choices[0].finish_reason!r}")
    check_usage(r.usage, 8)
    chunks = list(client.completions.create(stream=True, **kw))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    eq(streamed, text, "streamed text")


@check("completions (legacy): echo + logprobs scores the prompt")
def _():
    r = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=1, temperature=0,
                                  echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    eq(len(lp.tokens), r.usage.prompt_tokens + 1, "one entry per prompt and answer token")
    eq("".join(lp.tokens), r.choices[0].text, "tokens against the echoed text")
    expect(lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, "the first token has no log-probability")
    expect(all(x <= 0 for x in lp.token_logprobs[1:]), f"log-probabilities {lp.token_logprobs}")
    eq(len(lp.top_logprobs[1]), 2, "alternatives of a prompt token")
    # Streamed: the prompt with its log-probabilities first, then the answer's; the same lists.
    kw = dict(model=CHAT, prompt="The capital of France is", max_tokens=4, temperature=0, echo=True, logprobs=2)
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    eq("".join(c.text for c in chunks), whole.text, "streamed text")
    for key in ("tokens", "token_logprobs", "text_offset"):
        got = [x for c in chunks if c.logprobs for x in getattr(c.logprobs, key)]
        want = getattr(whole.logprobs, key)
        if key == "token_logprobs":
            expect(got[0] is None and all(abs(a - b) < 1e-3 for a, b in zip(got[1:], want[1:])), f"{got} {want}")
        else:
            eq(got, want, f"streamed {key}")


@check("embeddings: float, list of 3")
def _():
    r = client.embeddings.create(model=EMBED, input=SENTENCES, encoding_format="float")
    eq(r.model, EMBED, "model")
    eq(len(r.data), 3, "len(data)")
    eq([d.index for d in r.data], [0, 1, 2], "indices")
    for d in r.data:
        eq(len(d.embedding), EMBED_DIMS, f"dims of {d.index}")
        norm = math.sqrt(sum(x * x for x in d.embedding))
        expect(abs(norm - 1) <= 1e-3, f"L2 norm of {d.index} = {norm}")
    expect(r.usage.prompt_tokens > 0, f"prompt_tokens={r.usage.prompt_tokens}")
    v = [unit(d.embedding) for d in r.data]
    close, far = float(v[0] @ v[1]), float(v[0] @ v[2])
    expect(close > far, f"cos(cat, kitten)={close:.3f} <= cos(cat, revenue)={far:.3f}")


@check("embeddings: base64 (raw and SDK default) equals float")
def _():
    floats = np.array([d.embedding for d in
                       client.embeddings.create(model=EMBED, input=SENTENCES, encoding_format="float").data])
    status, _, body = http("POST", "/v1/embeddings",
                           {"model": EMBED, "input": SENTENCES, "encoding_format": "base64"})
    eq(status, 200, "raw base64 status")
    data = sorted(json.loads(body)["data"], key=lambda d: d["index"])
    eq(len(data), 3, "raw base64 len(data)")
    for d in data:
        expect(isinstance(d["embedding"], str), f"base64 embedding is {type(d['embedding']).__name__}")
    raw = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data])
    eq(raw.shape, (3, EMBED_DIMS), "raw base64 shape")
    diff = float(np.max(np.abs(raw - floats)))
    expect(diff <= 1e-5, f"raw base64 vs float max diff {diff}")
    # without encoding_format the SDK itself asks for base64 and decodes it
    sdk = np.array([d.embedding for d in client.embeddings.create(model=EMBED, input=SENTENCES).data])
    eq(sdk.shape, (3, EMBED_DIMS), "SDK default shape")
    diff = float(np.max(np.abs(sdk - floats)))
    expect(diff <= 1e-5, f"SDK default (base64) vs float max diff {diff}")


@check("embeddings: string input")
def _():
    r = client.embeddings.create(model=EMBED, input=SENTENCES[0], encoding_format="float")
    eq(len(r.data), 1, "len(data)")
    eq(len(r.data[0].embedding), EMBED_DIMS, "dims")
    batch = client.embeddings.create(model=EMBED, input=SENTENCES, encoding_format="float").data[0].embedding
    diff = float(np.max(np.abs(np.array(r.data[0].embedding) - np.array(batch))))
    expect(diff <= 1e-3, f"single vs batched max diff {diff}")


@check("tokenize: counts what chat counts (tools too); detokenize round-trips; bad ids -> 400")
def _():
    tools = [{"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}}}}}]
    for kw in ({}, {"tools": tools}):
        st, _, raw = http("POST", "/tokenize", {"model": CHAT, "messages": MSG, **kw})
        eq(st, 200, "status")
        tok = json.loads(raw)
        used = chat(max_tokens=1, **kw).usage.prompt_tokens
        eq((tok["count"], len(tok["tokens"]), tok["max_model_len"]), (used, used, CHAT_CONTEXT), f"count {kw.keys()}")
    st, _, raw = http("POST", "/tokenize", {"model": CHAT, "prompt": "Hello world", "return_token_strs": True})
    tok = json.loads(raw)
    eq(len(tok["token_strs"]), tok["count"], "token_strs")
    st, _, raw = http("POST", "/detokenize", {"model": CHAT, "tokens": tok["tokens"]})
    eq(json.loads(raw)["prompt"], "Hello world", "round trip")
    st, _, raw = http("POST", "/detokenize", {"model": CHAT, "tokens": [1, -5]})
    eq(check_error_json(st, raw, 400)["param"], "tokens[1]", "bad id")
    st, _, raw = http("POST", "/tokenize", {"model": EMBED, "messages": MSG})
    eq(check_error_json(st, raw, 400)["param"], "messages", "no template on an embedding model")


@check("rerank and score: embedding similarity, ranked; as the embeddings' cosine")
def _():
    docs = SENTENCES[2:] + SENTENCES[1:2] + [{"text": "Dogs bark at night."}]
    st, _, raw = http("POST", "/v1/rerank", {"model": EMBED, "query": SENTENCES[0], "documents": docs, "top_n": 2})
    eq(st, 200, "status")
    r = json.loads(raw)
    eq([x["index"] for x in r["results"]][0], 1, "the kitten ranks first")
    eq((len(r["results"]), r["results"][0]["document"]["text"]), (2, SENTENCES[1]), "top_n and document")
    vecs = [np.array(d.embedding) for d in client.embeddings.create(model=EMBED, input=SENTENCES[:2]).data]
    cos = float(vecs[0] @ vecs[1] / np.linalg.norm(vecs[0]) / np.linalg.norm(vecs[1]))
    expect(abs(r["results"][0]["relevance_score"] - cos) < 1e-4, f"{r['results'][0]} against {cos}")
    st, _, raw = http("POST", "/v1/score", {"model": EMBED, "text_1": SENTENCES[0], "text_2": SENTENCES[1:]})
    scores = [d["score"] for d in json.loads(raw)["data"]]
    expect(abs(scores[0] - cos) < 1e-4 and scores[0] > scores[1], f"scores {scores}")
    st, _, raw = http("POST", "/v1/rerank", {"model": EMBED, "query": "x", "documents": ["ok", ""]})
    eq(check_error_json(st, raw, 400)["param"], "documents[1]", "empty document")
    st, _, raw = http("POST", "/v1/score", {"model": CHAT, "text_1": "a", "text_2": "b"})
    eq(check_error_json(st, raw, 400)["param"], "model", "a chat model")


@check("errors: unknown model -> 404")
def _():
    sdk_error(openai.NotFoundError, lambda: client.chat.completions.create(
        model="no-such-model", messages=MSG, max_tokens=4), 404)


@check("errors: temperature=5 -> 400 param=temperature")
def _():
    err = sdk_error(openai.BadRequestError, lambda: chat(temperature=5, max_tokens=4), 400)
    eq(err["param"], "temperature", "error.param")


@check("errors: empty messages -> 400")
def _():
    sdk_error(openai.BadRequestError, lambda: chat(messages=[], max_tokens=4), 400)


@check("errors: max_tokens=100000 -> 400 mentioning the context")
def _():
    err = sdk_error(openai.BadRequestError, lambda: chat(max_tokens=100000), 400)
    expect("context" in err["message"].lower(), f"message does not mention the context: {err['message']!r}")


@check("errors: malformed JSON body -> 400")
def _():
    status, _, body = http("POST", "/v1/chat/completions", raw=b'{"model": "' + CHAT.encode() + b'", "messages": [')
    check_error_json(status, body, 400)


@check("concurrency: 16 streaming greedy requests match solo runs")
def _():
    def run(prompt):
        _, text = stream_chat(messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=32)
        return text

    solo = {p: run(p) for p in CONCURRENT_PROMPTS}
    for p, t in solo.items():
        expect(t, f"empty solo output for {p!r}")
    jobs = [CONCURRENT_PROMPTS[i % len(CONCURRENT_PROMPTS)] for i in range(16)]
    barrier = threading.Barrier(len(jobs))

    def job(prompt):
        barrier.wait(timeout=60)
        return run(prompt)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outs = list(pool.map(job, jobs, timeout=600))
    dt = time.monotonic() - t0
    bad = [(i, p, o) for i, (p, o) in enumerate(zip(jobs, outs)) if o != solo[p]]
    expect(not bad, f"{len(bad)}/16 differ from solo, first: #{bad[0][0]} got {bad[0][2]!r} "
                    f"want {solo[bad[0][1]]!r}" if bad else "")
    print(f"  16 concurrent streams done in {dt:.1f}s", flush=True)


# --------------------------------------------------------------------------- responses


@check("responses: create answers as chat does; retrieve, input items, delete")
def _():
    r = client.responses.create(model=CHAT, input=MSG[0]["content"], temperature=0, max_output_tokens=16)
    expect(r.id.startswith("resp_"), f"id {r.id!r}")
    eq(r.model, CHAT, "model")
    eq(r.output_text, greedy().choices[0].message.content, "greedy text against chat")
    eq(r.usage.input_tokens, greedy().usage.prompt_tokens, "input_tokens")
    eq(r.usage.total_tokens, r.usage.input_tokens + r.usage.output_tokens, "total_tokens")
    eq(client.responses.retrieve(r.id).output_text, r.output_text, "retrieved text")
    items = client.responses.input_items.list(r.id).data
    eq([(i.role, i.content[0].text) for i in items], [("user", MSG[0]["content"])], "input items")
    client.responses.delete(r.id)
    sdk_error(openai.NotFoundError, lambda: client.responses.retrieve(r.id), 404)


@check("responses: previous_response_id continues the conversation; instructions")
def _():
    # The prompt must be that of the same conversation sent whole to chat completions (a 135M
    # model need not remember the name, so the check is on tokens and text, not on "Ada").
    first = client.responses.create(model=CHAT, input="My name is Ada. Reply with OK.",
                                    temperature=0, max_output_tokens=8)
    r = client.responses.create(model=CHAT, input="What is my name?", previous_response_id=first.id,
                                instructions="Answer in one short sentence.", temperature=0,
                                max_output_tokens=16)
    eq(r.previous_response_id, first.id, "previous_response_id")
    want = chat(messages=[{"role": "system", "content": "Answer in one short sentence."},
                          {"role": "user", "content": "My name is Ada. Reply with OK."},
                          {"role": "assistant", "content": first.output_text},
                          {"role": "user", "content": "What is my name?"}], temperature=0, max_tokens=16)
    eq(r.usage.input_tokens, want.usage.prompt_tokens, "input_tokens of the continued conversation")
    eq(r.output_text, want.choices[0].message.content, "text against the same chat")


@check("responses: input_tokens.count equals the usage a response reports (history, tools)")
def _():
    tools = [{"type": "function", "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}]
    first = client.responses.create(model=CHAT, input="What is 2+2?", instructions="Be brief.", max_output_tokens=4)
    eq(client.responses.input_tokens.count(model=CHAT, input="What is 2+2?", instructions="Be brief.").input_tokens,
       first.usage.input_tokens, "plain")
    kw = dict(input="And with a tool?", previous_response_id=first.id, tools=tools)
    counted = client.responses.input_tokens.count(**kw)  # model: the default chat model
    eq((counted.object, counted.input_tokens), ("response.input_tokens",
       client.responses.create(model=CHAT, max_output_tokens=4, **kw).usage.input_tokens), "history and tools")
    err = sdk_error(openai.BadRequestError, lambda: client.responses.input_tokens.count(
        model=CHAT, input="x", previous_response_id="resp_nope"), 400)
    eq(err["param"], "previous_response_id", "unknown previous response")


@check("responses: streamed events add up to the response; SDK stream helper")
def _():
    with client.responses.stream(model=CHAT, input=MSG[0]["content"], temperature=0,
                                 max_output_tokens=64) as stream:
        kinds, text = [], ""
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = stream.get_final_response()
    eq(kinds[:2], ["response.created", "response.in_progress"], "first events")
    eq(kinds[-1], "response.completed", "last event")
    eq(final.output_text, text, "final text against the deltas")
    eq(final.status, "completed", "status")


@check("responses: max_output_tokens -> incomplete; hosted tools, images -> 400 naming the field")
def _():
    r = client.responses.create(model=CHAT, input=LONG_MSG[0]["content"], max_output_tokens=4, store=False)
    eq((r.status, r.incomplete_details.reason, r.usage.output_tokens),
       ("incomplete", "max_output_tokens", 4), "status, reason, output tokens")
    sdk_error(openai.NotFoundError, lambda: client.responses.retrieve(r.id), 404)
    for kw, param in [(dict(tools=[{"type": "web_search"}]), "tools[0].type"),
                      (dict(text={"format": {"type": "json_schema", "schema": {}}}), "text.format.name"),
                      (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]),
                       "input[0].content[0]")]:
        args = dict(model=CHAT, input="Hi")
        args.update(kw)
        err = sdk_error(openai.BadRequestError, lambda: client.responses.create(**args), 400)
        eq(err["param"], param, "param")


# --------------------------------------------------------------------------- structured output + tools

WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}


def check_weather_args(name, arguments):
    eq(name, "get_weather", "tool name")
    args = json.loads(arguments)
    eq(sorted(args), ["city", "unit"], "argument names")
    expect(isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit"), f"arguments {args}")


@check("anthropic: messages through the Anthropic SDK, streamed or not; stop sequences, tools, count, errors")
def _():
    import anthropic
    ac = anthropic.Anthropic(base_url=BASE, api_key="none", max_retries=0, timeout=300)
    greedy_kw = dict(model=CHAT, max_tokens=16, messages=MSG, extra_body={"temperature": 0})
    r = ac.messages.create(**greedy_kw)
    want = greedy().choices[0].message.content
    eq((r.type, r.role, r.content[0].type, r.content[0].text), ("message", "assistant", "text", want), "as chat answers")
    eq(r.usage.input_tokens + r.usage.cache_read_input_tokens,
       ac.messages.count_tokens(model=CHAT, messages=MSG).input_tokens, "usage against count_tokens")
    with ac.messages.stream(**greedy_kw) as s:
        eq("".join(s.text_stream), want, "streamed text")
        eq(s.get_final_message().stop_reason, r.stop_reason, "streamed stop_reason")
    # A prefill: the answer goes on from the final assistant turn (and chat's continue_final_message).
    head = want[:want.index(" ", 4)]
    r = ac.messages.create(**dict(greedy_kw, messages=MSG + [{"role": "assistant", "content": head}]))
    eq(head + r.content[0].text, want, "prefill")
    c = client.chat.completions.create(model=CHAT, messages=MSG + [{"role": "assistant", "content": head}], max_tokens=16,
                                       temperature=0, extra_body={"continue_final_message": True})
    eq(head + c.choices[0].message.content, want, "continue_final_message")
    cut = want.split()[2]
    r = ac.messages.create(**dict(greedy_kw, stop_sequences=[cut]))
    eq((r.stop_reason, r.stop_sequence, r.content[0].text), ("stop_sequence", cut, want[:want.index(cut)]), "stop")
    tools = [{"name": "get_weather", "description": "The weather of a city", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = ac.messages.create(model=CHAT, max_tokens=64, messages=ask, tools=tools,
                           tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    call = r.content[0]
    eq((call.type, call.name, sorted(call.input)), ("tool_use", "get_weather", ["city"]), "tool_use block")
    history = ask + [{"role": "assistant", "content": r.content},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}]}]
    expect(ac.messages.count_tokens(model=CHAT, messages=history, tools=tools).input_tokens >
           ac.messages.count_tokens(model=CHAT, messages=ask, tools=tools).input_tokens, "the result joins the prompt")
    r = ac.messages.create(model=CHAT, max_tokens=8, messages=history, tools=tools, tool_choice={"type": "none"})
    eq(r.content[0].type, "text", "an answer after the result")
    # A result and text in one user turn, as Claude Code sends them; streamed calls add up.
    history[-1]["content"].append({"type": "text", "text": "Answer briefly."})
    with ac.messages.stream(model=CHAT, max_tokens=64, messages=history, tools=tools,
                            tool_choice={"type": "tool", "name": "get_weather"}) as s:
        final = s.get_final_message()
    eq((final.stop_reason, final.content[0].type, sorted(final.content[0].input)), ("tool_use", "tool_use", ["city"]),
       "streamed tool_use")
    try:
        ac.messages.create(model=CHAT, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
        raise AssertionError("an image was accepted")
    except anthropic.BadRequestError as e:
        eq((e.body["type"], e.body["error"]["type"]), ("error", "invalid_request_error"), "Anthropic's error shape")
    try:
        ac.messages.create(model="no-such-model", max_tokens=8, messages=MSG)
        raise AssertionError("an unknown model was accepted")
    except anthropic.NotFoundError as e:
        eq(e.body["error"]["type"], "not_found_error", "404 type")


@check("structured: chat.completions.parse with a pydantic model; json_object; vLLM choice")
def _():
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    r = client.chat.completions.parse(model=CHAT, messages=[{"role": "user", "content": "Alice is 30. Who is she?"}],
                                      response_format=Person, temperature=0, max_tokens=60)
    person = r.choices[0].message.parsed
    expect(isinstance(person, Person) and isinstance(person.age, int), f"parsed {person!r}")
    r = chat(messages=[{"role": "user", "content": "List three colors."}], response_format={"type": "json_object"},
             temperature=0, max_tokens=100)
    expect(isinstance(json.loads(r.choices[0].message.content), dict), "json_object answer is an object")
    r = chat(messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=1.0, max_tokens=5,
             extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    expect(r.choices[0].message.content in ("yes", "no"), f"choice {r.choices[0].message.content!r}")
    err = sdk_error(openai.BadRequestError, lambda: chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}), 400)
    eq(err["param"], "response_format.json_schema.schema", "param")


@check("tools: required and named calls follow the schema, stream, and take their results back")
def _():
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": WEATHER, "strict": True}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = chat(messages=ask, tools=tools, tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=80)
    eq(r.choices[0].finish_reason, "tool_calls", "finish_reason")
    msg = r.choices[0].message
    eq(len(msg.tool_calls), 1, "calls")
    check_weather_args(msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments)
    with client.chat.completions.stream(model=CHAT, messages=ask, tools=tools, temperature=0, max_tokens=80,
                                        tool_choice={"type": "function", "function": {"name": "get_weather"}}) as s:
        for _event in s:
            pass
        final = s.get_final_completion()
    call = final.choices[0].message.tool_calls[0].function
    check_weather_args(call.name, call.arguments)
    followup = ask + [msg.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"sky": "sunny"}'}]
    r2 = chat(messages=followup, tools=tools, tool_choice="none", temperature=0, max_tokens=20)
    expect(r2.choices[0].message.tool_calls is None, "no calls with tool_choice none")
    expect(r2.usage.prompt_tokens > r.usage.prompt_tokens, "the call and its result are in the prompt")


@check("tools: responses function calls, function_call_output, responses.parse")
def _():
    from pydantic import BaseModel

    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER, "strict": True}]
    r = client.responses.create(model=CHAT, input="What is the weather in Paris?", tools=tools,
                                tool_choice="required", parallel_tool_calls=False, temperature=0, max_output_tokens=80)
    eq(r.output[0].type, "function_call", "output item")
    check_weather_args(r.output[0].name, r.output[0].arguments)
    r2 = client.responses.create(model=CHAT, previous_response_id=r.id, temperature=0, max_output_tokens=20,
                                 input=[{"type": "function_call_output", "call_id": r.output[0].call_id,
                                         "output": "sunny"}])
    eq(r2.output[0].type, "message", "the answer after the call")

    class City(BaseModel):
        city: str
        country: str

    p = client.responses.parse(model=CHAT, input="Name a city in Japan.", text_format=City, temperature=0,
                               max_output_tokens=60)
    expect(isinstance(p.output_parsed, City), f"parsed {p.output_parsed!r}")


@check("responses: background polled, streamed again from an event, cancelled")
def _():
    r = client.responses.create(model=CHAT, input="Say hello.", background=True, temperature=0,
                                max_output_tokens=200)
    eq((r.status, r.background), ("queued", True), "created")
    t0 = time.monotonic()
    while r.status in ("queued", "in_progress"):
        expect(time.monotonic() - t0 < 60, f"still {r.status}")
        time.sleep(0.05)
        r = client.responses.retrieve(r.id)
    eq(r.status, "completed", "polled to its end")
    events = list(client.responses.retrieve(r.id, stream=True, starting_after=2))
    eq(events[0].sequence_number, 3, "first event after starting_after")
    eq(events[-1].response.output_text, r.output_text, "the streamed end")
    with client.responses.stream(response_id=r.id) as s:
        eq(s.get_final_response().output_text, r.output_text, "stream helper")
    essay = {"type": "object", "properties": {"essay": {"type": "string", "minLength": 8000}},
             "required": ["essay"]}
    long = client.responses.create(model=CHAT, input="Write an essay.", background=True, max_output_tokens=4000,
                                   text={"format": {"type": "json_schema", "name": "essay", "schema": essay}})
    time.sleep(0.3)
    c = client.responses.cancel(long.id)
    eq(c.status, "cancelled", "cancelled")
    expect(0 < c.usage.output_tokens < 4000, f"cut short: {c.usage.output_tokens}")
    eq(client.responses.retrieve(long.id).status, "cancelled", "stored cancelled")
    sdk_error(openai.BadRequestError,
              lambda: client.responses.create(model=CHAT, input="x", background=True, store=False), 400)


@check("conversations: a history responses read and add to; items listed, added, deleted")
def _():
    first = {"type": "message", "role": "user", "content": "My name is Ada."}
    conv = client.conversations.create(items=[first], metadata={"topic": "names"})
    eq((conv.object, conv.metadata), ("conversation", {"topic": "names"}), "created")
    question = "What is my name?"
    r = client.responses.create(model=CHAT, conversation=conv.id, input=question, temperature=0, max_output_tokens=12)
    eq(r.conversation.id, conv.id, "response's conversation")
    same = client.responses.create(model=CHAT, input=[first, {"role": "user", "content": question}], temperature=0,
                                   max_output_tokens=12)
    eq(r.output_text, same.output_text, "the history read as input")
    items = client.conversations.items.list(conv.id, order="asc")
    eq([i.role for i in items.data], ["user", "user", "assistant"], "items after the response")
    added = client.conversations.items.create(conv.id, items=[{"role": "user", "content": "hi"}])
    got = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
    eq(got.content[0].text, "hi", "item read back")
    eq(len(list(client.conversations.items.list(conv.id, limit=1))), 4, "auto-paged items")
    client.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    eq(client.conversations.update(conv.id, metadata={"topic": "x"}).metadata, {"topic": "x"}, "metadata")
    eq(client.conversations.delete(conv.id).deleted, True, "deleted")
    sdk_error(openai.NotFoundError, lambda: client.conversations.retrieve(conv.id), 404)
    sdk_error(openai.BadRequestError, lambda: client.responses.create(model=CHAT, input="x", conversation=conv.id), 400)


@check("chat: store keeps a completion, streamed or not; retrieve, list, messages, update, delete")
def _():
    r = chat(messages=[{"role": "user", "content": "Say hi."}], store=True, metadata={"smoke": "plain"},
             max_tokens=8, temperature=0)
    got = client.chat.completions.retrieve(r.id)
    eq(got.choices[0].message.content, r.choices[0].message.content, "retrieved answer")
    eq([m.content for m in client.chat.completions.messages.list(r.id)], ["Say hi."], "stored messages")
    s = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Count."}], store=True,
                                       max_tokens=8, temperature=0, stream=True)
    sid, text = None, ""
    for ch in s:
        sid = ch.id
        text += "".join(c.delta.content or "" for c in ch.choices)
    eq(client.chat.completions.retrieve(sid).choices[0].message.content, text, "a stream kept whole")
    listed = [c.id for c in client.chat.completions.list(metadata={"smoke": "plain"})]
    expect(r.id in listed and sid not in listed, f"metadata filter: {listed}")
    eq(client.chat.completions.update(r.id, metadata={"smoke": "x"}).id, r.id, "update")
    eq(client.chat.completions.delete(r.id).deleted, True, "delete")
    sdk_error(openai.NotFoundError, lambda: client.chat.completions.retrieve(r.id), 404)


# --------------------------------------------------------------------------- files + batches


def batch_file(lines):
    import io
    return client.files.create(file=("input.jsonl", io.BytesIO("".join(json.dumps(l) + "\n" for l in lines).encode())),
                               purpose="batch")


def wait_batch(batch_id, limit=300):
    t0 = time.monotonic()
    while True:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "cancelled", "expired"):
            return b
        expect(time.monotonic() - t0 < limit, f"batch still {b.status} after {limit}s: {b.request_counts}")
        time.sleep(0.5)


@check("batches: a JSONL file runs through chat completions; output and error files")
def _():
    body = dict(model=CHAT, messages=MSG, temperature=0, max_tokens=16)
    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body} for i in range(3)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": dict(body, temperature=9)})
    f = batch_file(lines)
    eq((f.purpose, f.filename, f.status), ("batch", "input.jsonl", "processed"), "file object")
    eq(client.files.retrieve(f.id).bytes, f.bytes, "bytes")
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"run": "smoke"})
    eq((b.status, b.metadata), ("validating", {"run": "smoke"}), "new batch")
    b = wait_batch(b.id)
    eq(b.status, "completed", "status")
    eq((b.request_counts.total, b.request_counts.completed, b.request_counts.failed), (4, 3, 1), "request_counts")
    out = [json.loads(l) for l in client.files.content(b.output_file_id).text.splitlines()]
    eq(sorted(o["custom_id"] for o in out), ["q0", "q1", "q2"], "output custom ids")
    want = greedy().choices[0].message.content
    for o in out:
        eq(o["response"]["body"]["choices"][0]["message"]["content"], want, "batch answer against chat")
    err = [json.loads(l) for l in client.files.content(b.error_file_id).text.splitlines()]
    eq((err[0]["custom_id"], err[0]["response"]["status_code"], err[0]["response"]["body"]["error"]["param"]),
       ("bad", 400, "temperature"), "error line")
    expect(b.id in [x.id for x in client.batches.list(limit=100).data], "batch not listed")
    expect(b.output_file_id in [x.id for x in client.files.list(purpose="batch_output").data], "output not listed")
    eq(client.files.delete(f.id).deleted, True, "deleted")
    sdk_error(openai.NotFoundError, lambda: client.files.retrieve(f.id), 404)


@check("batches: cancel keeps the answers so far; a bad file fails with its lines named")
def _():
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": CHAT, "prompt": f"Story {i}:", "max_tokens": 32, "ignore_eos": True}} for i in range(300)]
    b = client.batches.create(input_file_id=batch_file(lines).id, endpoint="/v1/completions", completion_window="24h")
    until(lambda: expect(client.batches.retrieve(b.id).request_counts.completed > 0, "no progress"), limit=60)
    eq(client.batches.cancel(b.id).status, "cancelling", "cancel")
    b = wait_batch(b.id, 60)
    eq(b.status, "cancelled", "status")
    done = b.request_counts.completed
    expect(0 < done < 300, f"completed {done}")
    eq(len(client.files.content(b.output_file_id).text.splitlines()), done, "output lines")
    bad = batch_file([{"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {"model": CHAT}}])
    b = wait_batch(client.batches.create(input_file_id=bad.id, endpoint="/v1/completions", completion_window="24h").id, 60)
    eq((b.status, b.errors.data[0].code, b.errors.data[0].line), ("failed", "invalid_method", 1), "validation")
    err = sdk_error(openai.BadRequestError, lambda: client.batches.create(
        input_file_id=bad.id, endpoint="/v1/models", completion_window="24h"), 400)
    eq(err["param"], "endpoint", "param")


@check("uploads: a file sent in parts (SDK chunked helper) runs as a batch; md5, sizes, cancel")
def _():
    import hashlib
    import tempfile
    body = {"model": CHAT, "messages": MSG, "temperature": 0, "max_tokens": 8}
    lines = [{"custom_id": f"u{i}", "method": "POST", "url": "/v1/chat/completions", "body": body} for i in range(3)]
    data = "".join(json.dumps(l) + "\n" for l in lines).encode()
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as tmp:
        tmp.write(data)
        tmp.flush()
        up = client.uploads.upload_file_chunked(file=tmp.name, mime_type="application/jsonl", purpose="batch",
                                                part_size=100)
    eq((up.status, up.bytes, up.file.bytes, up.file.purpose), ("completed", len(data), len(data), "batch"), "upload")
    eq(client.files.content(up.file.id).content, data, "the file is the parts in order")
    b = wait_batch(client.batches.create(input_file_id=up.file.id, endpoint="/v1/chat/completions",
                                         completion_window="24h").id)
    eq((b.status, b.request_counts.completed), ("completed", 3), "batch of the uploaded file")
    # By hand: parts named out of order, a wrong md5, a part too many, cancel.
    up = client.uploads.create(bytes=6, filename="x.txt", mime_type="text/plain", purpose="user_data")
    eq((up.status, up.file, up.object), ("pending", None, "upload"), "created")
    p1 = client.uploads.parts.create(up.id, data=b"abc")
    p2 = client.uploads.parts.create(up.id, data=b"def")
    eq((p1.object, p1.upload_id), ("upload.part", up.id), "part")
    err = sdk_error(openai.BadRequestError, lambda: client.uploads.parts.create(up.id, data=b"1234567"), 400)
    eq(err["param"], "data", "a part larger than the upload")
    spare = client.uploads.parts.create(up.id, data=b"g")  # beyond the bytes: left out of part_ids
    err = sdk_error(openai.BadRequestError, lambda: client.uploads.complete(up.id, part_ids=[p2.id, p1.id], md5="0" * 32), 400)
    eq(err["param"], "md5", "md5 mismatch")
    err = sdk_error(openai.BadRequestError, lambda: client.uploads.complete(up.id, part_ids=[p1.id]), 400)
    eq(err["param"], "part_ids", "bytes mismatch")
    done = client.uploads.complete(up.id, part_ids=[p2.id, p1.id], md5=hashlib.md5(b"defabc").hexdigest())
    eq(client.files.content(done.file.id).content, b"defabc", "order of part_ids")
    sdk_error(openai.BadRequestError, lambda: client.uploads.cancel(up.id), 400)
    up = client.uploads.create(bytes=3, filename="y.txt", mime_type="text/plain", purpose="user_data")
    client.uploads.parts.create(up.id, data=b"ab")
    eq(client.uploads.cancel(up.id).status, "cancelled", "cancel")
    sdk_error(openai.BadRequestError, lambda: client.uploads.parts.create(up.id, data=b"c"), 400)
    err = sdk_error(openai.BadRequestError, lambda: client.uploads.create(
        bytes=0, filename="z", mime_type="text/plain", purpose="batch"), 400)
    eq(err["param"], "bytes", "bytes 0")
    sdk_error(openai.NotFoundError, lambda: client.uploads.cancel("upload_nope"), 404)


# --------------------------------------------------------------------------- platform


def cli(*args):
    """Runs the candela binary (on the server's data directory: same CANDELA_HOME)."""
    if not BIN:
        raise AssertionError("pass --bin PATH to run the platform checks")
    out = subprocess.run([BIN, *args], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise AssertionError(f"candela {' '.join(args)} failed: {out.stderr[-500:]}")
    return out.stdout


RUN = f"{int(time.time())}-{os.getpid()}"  # projects are per run: usage accumulates across runs


def new_token(project, ttl="1h"):
    """`candela token create` for this run's `project`: the secret is alone on the last line."""
    project = f"{project}-{RUN}"
    token = cli("token", "create", "--project", project, "--ttl", ttl).strip().splitlines()[-1]
    tid = next(line.split()[0] for line in cli("token", "list", "--project", project).splitlines()
               if line.split()[0] in token)
    return tid, token


def until(fn, limit=1.0):
    """Retries fn until it returns without raising, for at most `limit` seconds."""
    t0 = time.monotonic()
    while True:
        try:
            return fn()
        except (AssertionError, openai.APIStatusError):
            if time.monotonic() - t0 > limit:
                raise
            time.sleep(0.05)


def as_user(token):
    return OpenAI(base_url=BASE + "/v1", api_key=token, max_retries=0, timeout=300)


@check("platform: virtual models resolve on chat, completions and embeddings")
def _():
    raw = client.chat.completions.with_raw_response.create(
        model="chat@fastest", messages=MSG, max_tokens=4)
    eq(raw.parse().model, CHAT, "model")
    eq(raw.headers.get("x-candela-resolved-model"), CHAT, "x-candela-resolved-model")
    eq(client.completions.create(model="smollm@latest?context_size > 1000", prompt="Hi",
                                 max_tokens=2).model, CHAT, "completions model")
    eq(client.embeddings.create(model="embeddings@fastest", input="hello").model, EMBED,
       "embeddings model")
    err = sdk_error(openai.NotFoundError, lambda: client.chat.completions.create(
        model="llama@biggest?input_cost<0.5", messages=MSG), 404)
    expect("llama@biggest?input_cost<0.5" in err["message"], f"404 does not quote the query: {err}")
    err = sdk_error(openai.BadRequestError, lambda: client.chat.completions.create(
        model="chat@fastes", messages=MSG), 400)
    eq(err["param"], "model", "param")
    expect("fastes" in err["message"], f"400 does not point at the bad part: {err}")
    sdk_error(openai.BadRequestError, lambda: client.chat.completions.create(
        model="embeddings@fastest", messages=MSG), 400)
    status, _, body = http("GET", "/v1/models/resolve?query=chat%40fastest")
    eq(status, 200, "resolve status")
    eq(json.loads(body)["model"], CHAT, "resolved model")
    speeds = [m.model_extra.get("tokens_per_second") for m in client.models.list().data]
    expect(all(isinstance(v, (int, float)) and v > 0 for v in speeds), f"speeds: {speeds}")


@check("platform: token create, use, revoke (401) through the SDK and the CLI")
def _():
    tid, token = new_token("smoke")
    user = as_user(token)
    until(lambda: user.chat.completions.create(model=CHAT, messages=MSG, max_tokens=2))
    cli("token", "revoke", tid)
    t0 = time.monotonic()

    def refused():
        sdk_error(openai.AuthenticationError, lambda: user.models.list(), 401)

    until(refused)
    print(f"  revocation took effect after {time.monotonic() - t0:.2f}s", flush=True)
    expect("status=revoked" in cli("token", "list", "--project", f"smoke-{RUN}"), "token list")
    # A token in candela's format that the server does not know is refused, never anonymous.
    sdk_error(openai.AuthenticationError, lambda: as_user("cdl_" + "0" * 12 + "_" + "0" * 64)
              .models.list(), 401)


@check("platform: rate limit -> RateLimitError with retry-after and x-ratelimit headers")
def _():
    _, token = new_token("smoke-limited")
    cli("project", "set", f"smoke-limited-{RUN}", "--rpm", "2")
    user = as_user(token)

    def limited():
        raw = user.chat.completions.with_raw_response.create(model=CHAT, messages=MSG, max_tokens=1)
        eq(raw.headers.get("x-ratelimit-limit-requests"), "2", "x-ratelimit-limit-requests")

    until(limited)
    try:
        for _ in range(3):
            user.chat.completions.create(model=CHAT, messages=MSG, max_tokens=1)
    except openai.RateLimitError as e:
        eq(e.status_code, 429, "status")
        err = check_error_json(429, e.response.content, 429)
        eq(err["code"], "rate_limit_exceeded", "code")
        h = e.response.headers
        expect(h.get("retry-after", "").isdigit(), f"retry-after: {h.get('retry-after')}")
        eq(h.get("x-ratelimit-remaining-requests"), "0", "x-ratelimit-remaining-requests")
    else:
        raise AssertionError("no 429 after 3 calls at 2 requests per minute")


@check("platform: /v1/usage totals equal the usage the SDK received")
def _():
    _, token = new_token("smoke-usage")
    user = as_user(token)
    until(lambda: user.models.list())
    got = [user.chat.completions.create(model=CHAT, messages=MSG, max_tokens=n).usage for n in (3, 5)]
    got.append(user.embeddings.create(model=EMBED, input=SENTENCES).usage)
    req = urllib.request.Request(BASE + "/v1/usage", headers={"Authorization": f"Bearer {token}"})
    with NO_PROXY_OPENER.open(req, timeout=60) as r:
        usage = json.load(r)
    eq(usage["project"], f"smoke-usage-{RUN}", "project")
    eq(usage["total"]["requests"], 3, "requests")
    eq(usage["total"]["input_tokens"], sum(u.prompt_tokens for u in got), "input_tokens")
    eq(usage["total"]["output_tokens"], sum(getattr(u, "completion_tokens", 0) or 0 for u in got),
       "output_tokens")


@check("platform: /metrics is Prometheus text with request and engine metrics")
def _():
    status, headers, body = http("GET", "/metrics")
    eq(status, 200, "status")
    text = body.decode()
    for name in ("candela_requests_total", "candela_time_to_first_token_seconds_bucket",
                 "candela_num_requests_running", "candela_kv_cache_usage_ratio"):
        expect(name in text, f"{name} missing")


# --------------------------------------------------------------------------- main


def main():
    global BASE, BIN, client
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base_url", help="server root, e.g. http://127.0.0.1:8080")
    ap.add_argument("-k", default="", help="run only checks whose name contains this")
    ap.add_argument("--bin", default="", help="the candela binary (for the platform checks)")
    args = ap.parse_args()
    BIN = args.bin
    BASE = args.base_url.rstrip("/")
    if BASE.endswith("/v1"):
        BASE = BASE[:-3]
    client = OpenAI(base_url=BASE + "/v1", api_key="none", max_retries=0, timeout=300)

    passed = failed = 0
    for name, fn in CHECKS:
        if args.k and args.k not in name:
            continue
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            failed += 1
            msg = str(e).replace("\n", "\\n")
            print(f"FAIL {name}: {type(e).__name__}: {msg[:600]}", flush=True)
        else:
            passed += 1
            print(f"PASS {name} ({time.monotonic() - t0:.1f}s)", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
