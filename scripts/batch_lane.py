#!/usr/bin/env python3
"""Interactive latency while a batch runs, through the openai SDK against a running server.

Usage: python3 scripts/batch_lane.py PORT

Four streamed greedy chats (32 tokens) on the idle server, then a batch of 256 completions of 256
tokens each (ignore_eos), and while it runs eight more chats, one after another; prints the
median time to first token and to the last, idle and under the batch, then cancels the batch.
"""
import openai, json, time, io, sys, statistics
port = sys.argv[1]
c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x")
M = "smollm2-135m-instruct"
def chat():
    t0 = time.time(); ttft = None
    for ch in c.chat.completions.create(model=M, messages=[{"role": "user", "content": "Name three fruits."}], max_tokens=32, temperature=0, stream=True):
        if ttft is None and ch.choices and ch.choices[0].delta.content:
            ttft = time.time() - t0
    return ttft, time.time() - t0
base = [chat() for _ in range(4)]
lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
          "body": {"model": M, "prompt": f"Story {i}:", "max_tokens": 256, "ignore_eos": True}} for i in range(256)]
f = c.files.create(file=("in.jsonl", io.BytesIO("\n".join(json.dumps(l) for l in lines).encode())), purpose="batch")
b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
time.sleep(4)
loaded = [chat() for _ in range(8)]
b = c.batches.retrieve(b.id)
print("batch", b.status, b.request_counts)
c.batches.cancel(b.id)
while c.batches.retrieve(b.id).status == "cancelling": time.sleep(0.5)
med = lambda xs, k: statistics.median(x[k] for x in xs)
print(f"idle: ttft {med(base,0)*1000:.0f} ms, total {med(base,1)*1000:.0f} ms; under batch: ttft {med(loaded,0)*1000:.0f} ms (max {max(x[0] for x in loaded)*1000:.0f}), total {med(loaded,1)*1000:.0f} ms")
