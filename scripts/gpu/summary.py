#!/usr/bin/env python3
"""Puts the results of scripts/gpu-bench.sh side by side, as the README's performance section
reports them. Takes one or more result folders (the script's work folder, or an unpacked
gpu-bench.tar.gz; several when the phases ran in separate calls) and prints one JSON object:

  tests                    the last `test result` line of each crate's CUDA tests
  dependent_launch         whether the main runs launched kernels as programmatic dependent
                           launches (on, or off and why)
  torch                    scripts/gpu/torch_baseline.py's result (bandwidth, ceiling, generate)
  runs                     per candela bench run: output tok/s, TTFT, ITL, engine step timings
                           ("interrupted": the run outlasted its time and covers the requests
                           that finished)
  single_stream_tok_s      1000 / mean TPOT of the one-stream run with the longer output
  fraction_of_ceiling      that against the weights' bandwidth ceiling measured by PyTorch
  prefill_tok_s            prompt tokens / mean TTFT of the one-stream run with the longer prompt
  output_throughput_vs_transformers
                           candela at concurrency B over transformers' generate at batch B
  sharegpt_like            output tok/s (and P99 ITL) of the run at ShareGPT's mean lengths
  pdl_off_vs_on            TPOT and throughput with programmatic dependent launch off / on
  mma_off_vs_on            TTFT and throughput with the tensor-core prompt attention off / on
  skinny_off_vs_on         TPOT and throughput with the few-row matmul kernel off / on
  pool_off_vs_on           the same with the memory pool handing freed memory back every step
  offline_one_stream       the profile phase's in-process run (`bench --offline`, one stream):
                           output tok/s, TPOT, engine step time and launch share
  decode_kernels           per kernel (name and grid) of a one-stream decode step, from
                           Nsight Compute: launches, microseconds and share of the step's
                           kernel time, and DRAM GB/s (also as a fraction of PyTorch's read
                           bandwidth)
  unreadable               result files that did not parse (a run cut off while writing)

    python3 scripts/gpu/summary.py DIR [DIR ...]
"""
import csv
import glob
import json
import os
import re
import sys

RUN = re.compile(r"candela-(?P<label>[a-z-]+)-(?P<input>\d+)-(?P<output>\d+)-c(?P<conc>\d+)$")
KEYS = ("completed", "failed", "output_throughput", "total_token_throughput", "mean_ttft_ms",
        "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "p99_itl_ms", "engine_steps",
        "mean_tokens_per_step", "mean_step_ms", "mean_step_launch_ms", "step_launch_fraction",
        "interrupted", "unfinished")


# Nsight Compute's units, to seconds and bytes (reports print base units with --print-units base,
# scaled ones without).
UNITS = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "ns": 1e-9, "us": 1e-6,
         "ms": 1e-3, "s": 1.0, "byte": 1.0, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "KB": 1e3,
         "MB": 1e6, "GB": 1e9, "B": 1.0}


def decode_kernels(path, read_gbps):
    """Per kernel and grid, per decode step, from Nsight Compute's details page as CSV (a row
    per launch and metric). The steps are the sampling kernel's launches (one a step)."""
    launches = {}
    with open(path, newline="", errors="replace") as f:
        # ncu may print lines of its own before the table.
        lines = [l for l in f if l.startswith('"')]
    for row in csv.DictReader(lines):
        try:
            value = float(row["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        launch = launches.setdefault(row.get("ID"), {
            "kernel": row.get("Kernel Name", "?"), "grid": row.get("Grid Size", "")})
        launch[row.get("Metric Name")] = value * UNITS.get(row.get("Metric Unit", ""), 1.0)
    steps = sum(1 for l in launches.values() if l["kernel"].startswith("sample_rows")) or 1
    groups = {}
    for l in launches.values():
        g = groups.setdefault((l["kernel"], l["grid"]), {"launches": 0, "s": 0.0, "bytes": 0.0})
        g["launches"] += 1
        g["s"] += l.get("gpu__time_duration.sum", 0.0)
        g["bytes"] += l.get("dram__bytes_read.sum", 0.0) + l.get("dram__bytes_write.sum", 0.0)
    total = sum(g["s"] for g in groups.values()) or 1.0
    rows = []
    for (kernel, grid), g in sorted(groups.items(), key=lambda kv: -kv[1]["s"]):
        gbps = g["bytes"] / g["s"] / 1e9 if g["s"] else None
        rows.append({
            "kernel": kernel, "grid": grid, "launches_per_step": g["launches"] / steps,
            "us_per_step": g["s"] / steps * 1e6, "share": g["s"] / total, "dram_gb_s": gbps,
            "of_read_bandwidth": gbps / read_gbps if gbps and read_gbps else None})
    return {"steps": steps, "kernel_us_per_step": total / steps * 1e6, "by_kernel": rows}


def main(dirs):
    summary = {"tests": {}, "torch": {}, "runs": {}}
    unreadable = []

    def load(path):
        """A result file's JSON, or None (noted) when it is cut off or not JSON."""
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            unreadable.append(path)
            return None

    runs = {}
    for d in dirs:
        for crate in ("kernels", "models"):
            log = os.path.join(d, f"{crate}-test.log")
            if os.path.exists(log):
                results = [l.strip() for l in open(log, errors="replace")
                           if l.startswith("test result")]
                summary["tests"][crate] = results[-1] if results else "did not finish"
            # The rerun without programmatic dependent launch, after a failure with it.
            log = os.path.join(d, f"{crate}-test-pdl-off.log")
            if os.path.exists(log):
                results = [l.strip() for l in open(log, errors="replace")
                           if l.startswith("test result")]
                summary["tests"][f"{crate}_pdl_off"] = results[-1] if results else "did not finish"
        torch_path = os.path.join(d, "torch.json")
        if os.path.exists(torch_path):
            summary["torch"] = load(torch_path) or {}
        offline = os.path.join(d, "profile-decode.json")
        if os.path.exists(offline) and (r := load(offline)):
            summary["offline_one_stream"] = {k: r.get(k) for k in KEYS if k in r}
        for path in sorted(glob.glob(os.path.join(d, "candela-*.json"))):
            name = os.path.basename(path)[:-5]
            m = RUN.match(name)
            if not m:
                continue
            r = load(path)
            if r is None:
                continue
            runs[name] = dict(m.groupdict(), **{k: r.get(k) for k in KEYS if k in r})
    summary["runs"] = runs
    # Whether the kernels ran as programmatic dependent launches: off when the tests passed only
    # without them (gpu-bench.sh then turned them off), or when a driver refused them.
    pdl = "on"
    for d in dirs:
        for log in glob.glob(os.path.join(d, "gpu-bench.log")) + glob.glob(os.path.join(d, "serve-*.log")):
            text = open(log, errors="replace").read()
            if "pass with CANDELA_PDL=0 only" in text:
                pdl = "off: the GPU tests passed only without it"
            elif "refused programmatic dependent launches" in text and pdl == "on":
                pdl = "off: the driver refused it"
    summary["dependent_launch"] = pdl
    torch_res = summary["torch"]

    def run(label, input_len, output_len, conc):
        return runs.get(f"candela-{label}-{input_len}-{output_len}-c{conc}", {})

    # The lengths come from the runs themselves: long-prompt is INPUT_LEN in / OUTPUT_LEN out.
    long_prompt = [r for r in runs.values() if r["label"] == "long-prompt"]
    if long_prompt:
        in_len, out_len = long_prompt[0]["input"], long_prompt[0]["output"]
    else:
        in_len = out_len = None
    # Single-stream decode from the run with the longer output (more steps, less prompt in it);
    # prefill from the one-stream run with the longer prompt (its TTFT is that prompt's prefill).
    long_out = run("long-output", out_len, in_len, 1)
    long_in = run("long-prompt", in_len, out_len, 1)
    if long_out.get("mean_tpot_ms"):
        single = 1000.0 / long_out["mean_tpot_ms"]
        summary["single_stream_tok_s"] = single
        if torch_res.get("ceiling_tok_s"):
            summary["fraction_of_ceiling"] = single / torch_res["ceiling_tok_s"]
    if long_in.get("mean_ttft_ms"):
        summary["prefill_tok_s"] = int(in_len) / (long_in["mean_ttft_ms"] / 1000.0)
    for r in runs.values():
        if r["label"] == "sharegpt-like" and r.get("output_throughput"):
            summary["sharegpt_like"] = {k: r.get(k) for k in (
                "input", "output", "conc", "output_throughput", "p99_itl_ms", "mean_ttft_ms")}
    ratios = {}
    for g in torch_res.get("generate", []):
        r = run("long-prompt", torch_res.get("input_len"), torch_res.get("output_len"),
                g["batch"])
        if g.get("output_tok_s") and r.get("output_throughput"):
            ratios[f"batch_{g['batch']}"] = r["output_throughput"] / g["output_tok_s"]
    summary["output_throughput_vs_transformers"] = ratios
    # Each A/B run against the main run of the same lengths and concurrency.
    for label, key in (("pdl-off", "pdl_off_vs_on"), ("mma-off", "mma_off_vs_on"),
                       ("skinny-off", "skinny_off_vs_on"), ("pool-off", "pool_off_vs_on")):
        ab = {}
        for r in runs.values():
            if r["label"] != label:
                continue
            base = "long-prompt" if (r["input"], r["output"]) == (in_len, out_len) else "long-output"
            on = run(base, r["input"], r["output"], r["conc"])
            if not on.get("output_throughput") or not r.get("output_throughput"):
                continue
            ab[f"c{r['conc']}"] = {
                "ttft_off_over_on": (r.get("mean_ttft_ms") or 0) / (on.get("mean_ttft_ms") or 1),
                "tpot_off_over_on": (r.get("mean_tpot_ms") or 0) / (on.get("mean_tpot_ms") or 1),
                "throughput_off_over_on": r["output_throughput"] / on["output_throughput"],
            }
        if ab:
            summary[key] = ab
    for d in dirs:
        path = os.path.join(d, "ncu-decode.csv")
        if os.path.exists(path):
            try:
                summary["decode_kernels"] = decode_kernels(path, torch_res.get("read_gbps"))
            except (OSError, csv.Error) as e:
                unreadable.append(f"{path}: {e}")
    if unreadable:
        summary["unreadable"] = unreadable
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
