#!/usr/bin/env bash
# The GPU measurements of the README's performance section, in one call on the GPU machine
# (CUDA driver, PyTorch + transformers, no Rust, no internet). It builds nothing: it runs the
# binaries that scripts/cuda-build.sh made here (target/cuda/candela-gpu.gz, kernels-test.gz and
# models-test.gz, carried over).
#
#   bash scripts/gpu-bench.sh [OUT_DIR]        (OUT_DIR default: $OUT, else ./gpu-bench-out)
#
# 0. The tests of candela-kernels (each CUDA kernel against plain candle) and candela-models (the
#    forward pass on the GPU against the CPU) on the GPU: kernels-test.log, models-test.log.
# 1. PyTorch: HBM read bandwidth, the single-stream ceiling of the model's weights, and
#    transformers `generate` at batch 1 and BATCH_TORCH (scripts/gpu/torch_baseline.py).
# 2. candela serve with --load-format dummy at MODEL_CONFIG's shapes, then candela bench on
#    random INPUT_LEN/OUTPUT_LEN prompts at each of CONCURRENCY, then the swapped lengths.
# Every result is a JSON file in OUT_DIR; summary.json puts them side by side as ratios.
#
# Environment: MODEL_CONFIG (models/configs/llama-3.1-8b.json), CONCURRENCY ("1 8 32 128 256"),
# PROMPTS_PER_CONCURRENCY (4; at least 16 prompts), INPUT_LEN (1024), OUTPUT_LEN (128),
# BATCH_TORCH (128), CANDELA_FLAGS (extra `serve` flags), TORCH_FLAGS (extra torch_baseline.py
# flags). To try the script out without a GPU: CANDELA_BIN (a built candela instead of the
# carried one), DEVICE (cuda:0; `cpu`), KERNEL_TESTS=0 (skip them), PYTHON (python3), e.g.
#   CANDELA_BIN=target/release/candela DEVICE=cpu KERNEL_TESTS=0 MODEL_CONFIG=tiny.json \
#   CONCURRENCY="1 4" INPUT_LEN=64 OUTPUT_LEN=16 BATCH_TORCH=4 TORCH_FLAGS="--bandwidth-gib 0.25" \
#   bash scripts/gpu-bench.sh /tmp/gpu-bench-try
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$out"
config="${MODEL_CONFIG:-models/configs/llama-3.1-8b.json}"
concurrency="${CONCURRENCY:-1 8 32 128 256}"
per="${PROMPTS_PER_CONCURRENCY:-4}"
in_len="${INPUT_LEN:-1024}"
out_len="${OUTPUT_LEN:-128}"
device="${DEVICE:-cuda:0}"
python="${PYTHON:-python3}"
run="bash ../shared/scripts/gpu-run.sh"
[ -f ../shared/scripts/gpu-run.sh ] || run=""
say() { echo "gpu-bench: $*" >&2; }

bin="${CANDELA_BIN:-}"
if [ -z "$bin" ]; then
    bin=/tmp/candela-gpu
    gunzip -c target/cuda/candela-gpu.gz >"$bin"
    chmod +x "$bin"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt" || true

if [ "${KERNEL_TESTS:-1}" != 0 ]; then
    for crate in kernels models; do
        say "$crate tests"
        tests=/tmp/candela-$crate-test
        gunzip -c "target/cuda/$crate-test.gz" >"$tests"
        chmod +x "$tests"
        # shellcheck disable=SC2086
        $run "$tests" --test-threads=1 >"$out/$crate-test.log" 2>&1 ||
            say "$crate tests failed (see $out/$crate-test.log)"
        grep "test result" "$out/$crate-test.log" >&2 || true
    done
fi

say "PyTorch baseline"
# shellcheck disable=SC2086
"$python" scripts/gpu/torch_baseline.py --config "$config" --batch 1 "${BATCH_TORCH:-128}" \
    --input-len "$in_len" --output-len "$out_len" --device "${device%%:*}" ${TORCH_FLAGS:-} \
    --out "$out/torch.json" >"$out/torch.log" 2>&1 ||
    say "torch baseline failed (see $out/torch.log)"

say "candela serve $config (dummy weights)"
port=18123
# shellcheck disable=SC2086
CANDELA_HOME="$out/home" $run "$bin" serve --port "$port" --device "$device" --model "$config" \
    --load-format dummy --anonymous-rpm 0 ${CANDELA_FLAGS:-} >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { say "server exited"; tail -20 "$out/serve.log"; exit 1; }
    sleep 1
done

bench() { # input_len output_len concurrency
    local n=$(($3 * per)); [ "$n" -ge 16 ] || n=16
    "$bin" bench --base-url "http://127.0.0.1:$port" --tokenizer "$config" --ignore-eos \
        --random-input-len "$1" --random-output-len "$2" --max-concurrency "$3" \
        --num-prompts "$n" --num-warmups 1 --result-filename "$out/candela-$1-$2-c$3.json" \
        >"$out/candela-$1-$2-c$3.log" 2>&1 || say "bench $1/$2 c$3 failed"
}
for c in $concurrency; do bench "$in_len" "$out_len" "$c"; done
for c in $concurrency; do bench "$out_len" "$in_len" "$c"; done

"$python" - "$out" "$in_len" "$out_len" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
summary = {"candela": {}}
for crate in ("kernels", "models"):
    tests_log = os.path.join(out, f"{crate}-test.log")
    if os.path.exists(tests_log):
        results = [l.strip() for l in open(tests_log) if l.startswith("test result")]
        summary[f"{crate}_tests"] = results[-1] if results else "did not finish"
torch_path = os.path.join(out, "torch.json")
torch_res = json.load(open(torch_path)) if os.path.exists(torch_path) else {}
summary["torch"] = torch_res
for path in sorted(glob.glob(os.path.join(out, "candela-*.json"))):
    r = json.load(open(path))
    summary["candela"][os.path.basename(path)[:-5]] = {
        k: r.get(k) for k in ("completed", "output_throughput", "mean_ttft_ms", "p99_itl_ms", "mean_tpot_ms")}
runs = summary["candela"]
in_len, out_len = int(sys.argv[2]), int(sys.argv[3])
# Single-stream decode from the run with the longer output (more steps, less prompt in it);
# prefill from the one-stream run with the longer prompt (its TTFT is that prompt's prefill).
long_out = runs.get(f"candela-{min(in_len, out_len)}-{max(in_len, out_len)}-c1", {})
long_in = runs.get(f"candela-{max(in_len, out_len)}-{min(in_len, out_len)}-c1", {})
if long_out.get("mean_tpot_ms"):
    single = 1000.0 / long_out["mean_tpot_ms"]
    summary["single_stream_tok_s"] = single
    if torch_res.get("ceiling_tok_s"):
        summary["fraction_of_ceiling"] = single / torch_res["ceiling_tok_s"]
if long_in.get("mean_ttft_ms"):
    summary["prefill_tok_s"] = max(in_len, out_len) / (long_in["mean_ttft_ms"] / 1000.0)
# candela at concurrency B against transformers' generate at batch B, same lengths.
ratios = {}
for g in torch_res.get("generate", []):
    run = runs.get(f"candela-{in_len}-{out_len}-c{g['batch']}", {})
    if g.get("output_tok_s") and run.get("output_throughput"):
        ratios[f"batch_{g['batch']}"] = run["output_throughput"] / g["output_tok_s"]
summary["output_throughput_vs_transformers"] = ratios
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
