#!/usr/bin/env bash
# The GPU measurements of the README's performance section, on the GPU machine (CUDA driver,
# PyTorch + transformers, no Rust, no internet). It builds nothing: it runs the binaries that
# scripts/cuda-build.sh made here (target/cuda/candela-gpu.gz, kernels-test.gz, models-test.gz,
# carried over). One device call of 10 minutes measures everything:
#
#   bash scripts/gpu-bench.sh [OUT_DIR]        (device call: timeout_s 600)
#
# OUT_DIR (default: $OUT, else ./gpu-bench-out) receives three files: summary.json, gpu-bench.log
# (what this script said) and gpu-bench.tar.gz (every log and JSON result). Phases, in order:
#   tests        the CUDA tests of candela-kernels (each kernel against plain candle) and
#                candela-models (the forward pass in bf16 on the GPU against f32 on the CPU)
#   torch        PyTorch: HBM read bandwidth, the single-stream ceiling of the model's weights,
#                transformers `generate` at batch 1 and BATCH_TORCH (scripts/gpu/torch_baseline.py)
#   long-prompt  candela bench on random INPUT_LEN-in/OUTPUT_LEN-out prompts at each of
#                CONCURRENCY, against one candela serve --load-format dummy at MODEL_CONFIG's
#                shapes
#   long-output  the same with the lengths swapped, on the same server; the two alternate, a
#                concurrency at a time, in CONCURRENCY's order (one stream first, then the
#                busiest), so that a short budget loses the least telling runs
#   sharegpt-like  on the same server after the busiest pair: random prompts of ShareGPT's mean
#                lengths as vLLM's benchmark sees them (SHAREGPT_LEN, "220:200" in:out), each
#                drawn from ±90 % of it, SHAREGPT_PROMPTS (1000) of them at the highest of
#                CONCURRENCY: the load of vLLM's published throughput (no ShareGPT file can be
#                fetched there)
#   profile      where a one-stream decode step's GPU time goes, per kernel (Nsight Systems, where
#                the machine has one that writes reports; nsys-kernels.csv and nsys-api.csv),
#                else the same in-process run without it (`bench --offline`: step times)
#   kernels      each of candela's kernels in two steps of a one-stream decode, timed alone with
#                the DRAM bytes it moved (Nsight Compute, where the machine has it; ncu-decode.csv)
#   mma-off      long-prompt at concurrency 1 and 32 with the tensor-core prompt attention off
#                (CANDELA_ATTENTION_MMA=0): the A/B of that kernel
#   skinny-off   long-output at concurrency 1 and 8 with every matmul on cuBLAS
#                (CANDELA_SKINNY_GEMM=0): the A/B of the few-row matmul kernel
#   pdl-off      long-output at concurrency 1 and 8 with each kernel launched only once the one
#                before has completed (CANDELA_PDL=0): the A/B of programmatic dependent launch
#   pool-off     long-prompt at concurrency 32 and long-output at 128 with the device memory
#                pool handing freed memory back at every step, CUDA's default
#                (CANDELA_KEEP_FREED_MEMORY=0)
# Default PHASES: all of them. The A/B phases get only the time the others leave. The script stops
# starting work when less than a run's share of BUDGET_S (default 540 s) is left, and says what it
# skipped; a run that outlasts its share is stopped and reports the requests that finished (with
# "interrupted" in its JSON). OUT_DIR gets what was measured so far after every run, so a call
# killed at its limit still brings that back. Several calls' folders merge here with
# python3 scripts/gpu/summary.py DIR... (each DIR an unpacked gpu-bench.tar.gz).
#
# Environment: MODEL_CONFIG (models/configs/llama-3.1-8b.json), CONCURRENCY ("1 256 128 32 8"),
# SHAREGPT_LEN ("220:200"), SHAREGPT_PROMPTS (1000),
# PROMPTS_PER_CONCURRENCY (1; at least 2 prompts a run), INPUT_LEN (1024), OUTPUT_LEN (128),
# BATCH_TORCH (128), TESTS_S (75: each crate's tests), TORCH_S (120), CANDELA_FLAGS (extra
# `serve` flags), TORCH_FLAGS (extra torch_baseline.py flags). To try the script out without a
# GPU: CANDELA_BIN (a built candela instead of the carried one), DEVICE (cuda:0; `cpu`), PYTHON
# (python3), e.g.
#   CANDELA_BIN=target/release/candela DEVICE=cpu PHASES="torch long-prompt long-output" \
#   MODEL_CONFIG=tiny.json CONCURRENCY="1 4" INPUT_LEN=64 OUTPUT_LEN=16 BATCH_TORCH=4 \
#   TORCH_FLAGS="--bandwidth-gib 0.25" bash scripts/gpu-bench.sh /tmp/gpu-bench-try
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$(date +%s)
deadline=$((started + ${BUDGET_S:-540}))
out="${1:-${OUT:-gpu-bench-out}}"
mkdir -p "$out"
work=$(mktemp -d /tmp/gpu-bench.XXXXXX)
server=
phases=" ${PHASES:-tests torch long-prompt long-output sharegpt-like profile kernels pdl-off skinny-off mma-off pool-off} "
config="${MODEL_CONFIG:-models/configs/llama-3.1-8b.json}"
concurrency="${CONCURRENCY:-1 256 128 32 8}"
per="${PROMPTS_PER_CONCURRENCY:-1}"
in_len="${INPUT_LEN:-1024}"
out_len="${OUTPUT_LEN:-128}"
device="${DEVICE:-cuda:0}"
python="${PYTHON:-python3}"
say() { echo "gpu-bench [$(($(date +%s) - started))s]: $*" | tee -a "$work/gpu-bench.log" >&2; }
left() { echo $((deadline - $(date +%s))); }
at_most() { echo $(($1 < $2 ? $1 : $2)); }
has() { [[ $phases == *" $1 "* ]]; }

# What has been measured so far goes to OUT_DIR after every run, not only at the end: a call
# killed at its limit (the whole process group, this script's EXIT trap included) still brings
# back everything up to its last checkpoint.
checkpoint() {
    timeout 60 "$python" scripts/gpu/summary.py "$work" >"$work/summary.json.new" \
        2>>"$work/gpu-bench.log" && mv "$work/summary.json.new" "$work/summary.json" ||
        say "summary failed"
    cp "$work/summary.json" "$work/gpu-bench.log" "$out/" 2>/dev/null || true
    tar -czf "$out/gpu-bench.tar.gz.new" -C "$work" --exclude ./home . 2>/dev/null &&
        mv "$out/gpu-bench.tar.gz.new" "$out/gpu-bench.tar.gz"
    return 0
}
finish() {
    trap - EXIT
    stop_server
    checkpoint
    cat "$work/summary.json" >&2 || true
}
trap finish EXIT

# The CUDA libraries come from PyTorch's wheels there: scripts/gpu/run.sh puts them on the path.
run="bash scripts/gpu/run.sh"
# The kernels (candle's and candela's) ship as PTX that the driver compiles at first load, some
# 25 s of it: a cache big enough to keep it lets each later process (tests, servers) skip that.
export CUDA_CACHE_PATH="${CUDA_CACHE_PATH:-/tmp/candela-cuda-cache}" CUDA_CACHE_MAXSIZE=4294967296
mkdir -p "$CUDA_CACHE_PATH"

bin="${CANDELA_BIN:-}"
if [ -z "$bin" ]; then
    [ -f target/cuda/candela-gpu.gz ] ||
        say "target/cuda/candela-gpu.gz was not carried: only the tests can run"
    bin=/tmp/candela-gpu
    gunzip -c target/cuda/candela-gpu.gz >"$bin" 2>/dev/null || rm -f "$bin"
    [ ! -f "$bin" ] || chmod +x "$bin"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
    >"$work/gpu.txt" 2>&1 || true
say "phases:$phases budget ${BUDGET_S:-540}s; $(head -2 "$work/gpu.txt" | tail -1)"

if has tests; then
    # Only the tests that use the GPU: CI runs the others.
    for crate_filter in kernels:cuda_tests models:gpu_; do
        crate=${crate_filter%%:*}
        tests=/tmp/candela-$crate-test
        if [ ! -f "target/cuda/$crate-test.gz" ]; then
            say "target/cuda/$crate-test.gz was not carried: $crate tests skipped"
            continue
        fi
        gunzip -c "target/cuda/$crate-test.gz" >"$tests"
        chmod +x "$tests"
        say "$crate tests"
        # A device that does not open fails them rather than skipping them. Four at a time, on
        # the one device a process's tests share: their CPU references are the slow part.
        gpu_tests() { # log
            CANDELA_REQUIRE_GPU=1 timeout "$(at_most "${TESTS_S:-75}" $(($(left) / 4)))" \
                $run "$tests" "${crate_filter#*:}" --test-threads=4 >"$1" 2>&1
        }
        status=0
        gpu_tests "$work/$crate-test.log" || status=$?
        grep -E "^test .*(FAILED|panicked)|test result" "$work/$crate-test.log" >&2 || true
        if [ "$status" -ne 0 ]; then
            say "$crate tests failed or timed out (see $crate-test.log)"
            # Programmatic dependent launch is the one thing the CPU emulator cannot try: if the
            # tests pass without it, the rest of this call runs without it, and still measures.
            if [ "$status" -ne 124 ] && [ "${CANDELA_PDL:-1}" != 0 ]; then
                say "$crate tests again with CANDELA_PDL=0"
                if CANDELA_PDL=0 gpu_tests "$work/$crate-test-pdl-off.log"; then
                    say "$crate tests pass with CANDELA_PDL=0 only: the rest of this call sets it"
                    export CANDELA_PDL=0
                fi
                grep -E "test result" "$work/$crate-test-pdl-off.log" >&2 || true
            fi
        fi
    done
    checkpoint
fi

if has torch; then
    say "PyTorch baseline"
    # shellcheck disable=SC2086
    timeout "$(at_most "${TORCH_S:-120}" $(($(left) / 3)))" \
        "$python" scripts/gpu/torch_baseline.py --config "$config" --batch 1 "${BATCH_TORCH:-128}" --input-len "$in_len" --output-len "$out_len" \
        --device "${device%%:*}" ${TORCH_FLAGS:-} --out "$work/torch.json" >"$work/torch.log" 2>&1 ||
        say "torch baseline failed or timed out (see torch.log)"
    checkpoint
fi

port=18123
start_server() { # label, then env assignments for the server
    local label=$1
    shift
    say "candela serve $config (dummy weights) $*"
    # shellcheck disable=SC2086
    env "$@" CANDELA_HOME="$work/home" $run "$bin" serve --port "$port" --device "$device" \
        --model "$config" --load-format dummy --anonymous-rpm 0 ${CANDELA_FLAGS:-} \
        >"$work/serve-$label.log" 2>&1 &
    server=$!
    local code
    for _ in $(seq "$(at_most 300 "$(left)")"); do
        code=$(health)
        case $code in
        200) return 0 ;;
        # Up but unhealthy: a step failed (the start-up calibration's, say); waiting is futile.
        503)
            say "the server is up but unhealthy (see serve-$label.log)"
            tail -5 "$work/serve-$label.log" >&2
            return 1
            ;;
        esac
        kill -0 "$server" 2>/dev/null || break
        sleep 1
    done
    say "the server did not come up (see serve-$label.log)"
    tail -5 "$work/serve-$label.log" >&2
    return 1
}
# The HTTP status of the server's /health; 000 when nothing answers. curl where the machine has
# it, else Python's standard library.
health() {
    if command -v curl >/dev/null; then
        curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health" || true
        return
    fi
    "$python" - "$port" <<'PY' 2>/dev/null || echo 000
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
}
stop_server() {
    [ -n "$server" ] || return 0
    kill "$server" 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 "$server" 2>/dev/null || break
        sleep 1
    done
    kill -9 "$server" 2>/dev/null || true
    sleep 1
    kill -0 "$server" 2>/dev/null || wait "$server" 2>/dev/null || true
    server=
}
bench() { # label input_len output_len concurrency [range_ratio]
    local n=$(($4 * per)) budget=$(($(left) / runs_left)) name="candela-$1-$2-$3-c$4"
    [ "$n" -ge 2 ] || n=2
    [ "$1" = sharegpt-like ] && n=${SHAREGPT_PROMPTS:-1000}
    runs_left=$((runs_left - 1))
    if [ "$budget" -lt 20 ]; then
        say "skipped $name: ${budget}s of budget for it"
        return
    fi
    say "$name: $n prompts, at most ${budget}s"
    # On timeout's SIGTERM the bench stops and reports the requests that finished.
    timeout "$budget" $run "$bin" bench --base-url "http://127.0.0.1:$port" --tokenizer "$config" \
        --ignore-eos --random-input-len "$2" --random-output-len "$3" --max-concurrency "$4" \
        --random-range-ratio "${5:-0}" \
        --num-prompts "$n" --num-warmups 1 --result-filename "$work/$name.json" \
        >"$work/$name.log" 2>&1 || say "$name failed or ran out of time"
    grep -E "^interrupted|Output token throughput|Mean TTFT|P99 ITL|Launch share" \
        "$work/$name.log" | tr -s ' ' | paste -sd';' >&2 || true
    checkpoint
}
runs_with_server() { # label "label:input_len:output_len:concurrency ..." [server env...]
    local label=$1 list=$2
    shift 2
    runs_left=$(wc -w <<<"$list")
    if [ "$runs_left" -eq 0 ]; then return; fi
    if [ "$(left)" -lt 60 ] || ! start_server "$label" "$@"; then
        say "skipped $list ($(left)s left)"
        stop_server
        return
    fi
    local r l i o c ratio
    for r in $list; do
        IFS=: read -r l i o c ratio <<<"$r"
        bench "$l" "$i" "$o" "$c" "$ratio"
    done
    stop_server
}

# The main runs share one server; each gets an equal share of what is left for the runs still to
# come. The A/Bs then share what the main runs left.
main=""
busiest=$(tr ' ' '\n' <<<"$concurrency" | sort -n | tail -1)
for c in $concurrency; do
    has long-prompt && main="$main long-prompt:$in_len:$out_len:$c"
    has long-output && main="$main long-output:$out_len:$in_len:$c"
    [ "$c" = "$busiest" ] && has sharegpt-like &&
        main="$main sharegpt-like:${SHAREGPT_LEN:-220:200}:$c:0.9"
done
runs_with_server main "$main"

# Where a single-stream decode step's GPU time goes, per kernel: Nsight Systems (when the machine
# has one that writes reports) around an in-process engine (`bench --offline`, which exits by
# itself, so the report is written whole) decoding two 128-token answers one at a time. Leaves
# nsys-kernels.csv (time per kernel) and nsys-api.csv (host time per CUDA call). Without nsys the
# same offline run goes without it: the engine's own step times and launch share, in process.
if has profile; then
    nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems/*/bin/nsys \
        /usr/local/cuda*/nsight-systems-*/bin/nsys 2>/dev/null | head -1 || true)
    offline=("$bin" bench --offline --device "$device" --load-format dummy --model "$config"
        --tokenizer "$config" --ignore-eos --input-len 128 --output-len 128 --num-prompts 2
        --max-concurrency 1 --num-warmups 1 --disable-tqdm
        --result-filename "$work/profile-decode.json")
    if [ "$(left)" -lt 90 ]; then
        say "profile skipped ($(left)s left)"
    elif [ -z "$nsys" ]; then
        say "no nsys on this machine: one stream offline, without a profiler"
        timeout "$(at_most 120 $(($(left) / 2)))" $run "${offline[@]}" >"$work/profile.log" 2>&1 ||
            say "offline run failed or timed out (see profile.log)"
        grep -E "Output token throughput|Mean TPOT|Mean step|Launch share" "$work/profile.log" |
            tr -s ' ' | paste -sd';' >&2 || true
    else
        say "profile: $nsys, one stream, offline"
        # Kernels launched plainly (CANDELA_PDL=0): a dependent launch's time in the report
        # would include its wait for the kernel before.
        CANDELA_PDL=0 timeout "$(at_most 120 $(($(left) / 2)))" $run "$nsys" profile --trace=cuda \
            --sample=none --cpuctxsw=none --force-overwrite=true -o "$work/decode" \
            "${offline[@]}" >"$work/profile.log" 2>&1 ||
            say "profile failed or timed out (see profile.log)"
        # The reports' names changed over nsys versions (and .qdrep became .nsys-rep).
        rep=$(ls "$work"/decode.nsys-rep "$work"/decode.qdrep 2>/dev/null | head -1 || true)
        for report in cuda_gpu_kern_sum:kernels cuda_api_sum:api gpukernsum:kernels \
            cudaapisum:api; do
            [ -n "$rep" ] || break
            [ -s "$work/nsys-${report#*:}.csv" ] && continue
            "$nsys" stats --report "${report%%:*}" --format csv "$rep" \
                >"$work/nsys-${report#*:}.csv" 2>>"$work/profile.log" ||
                rm -f "$work/nsys-${report#*:}.csv"
        done
        head -12 "$work/nsys-kernels.csv" >&2 2>/dev/null || say "no kernel summary (see profile.log)"
        rm -f "$work"/decode.nsys-rep "$work"/decode.qdrep "$work"/decode.sqlite
    fi
    checkpoint
fi
# Each of candela's kernels in a one-stream decode step, timed alone, with the DRAM bytes it
# moved (Nsight Compute, one pass per kernel; ncu-decode.csv): which kernels keep a step from the
# bandwidth ceiling. Only candela's kernels are profiled (the others are few and small in a decode
# step), over about two steps of steady decoding, past the prompt and the first steps.
if has kernels; then
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu \
        2>/dev/null | head -1 || true)
    layers=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' \
        "$config" 2>/dev/null || echo 32)
    per_step=$((8 * layers + 4)) # 8 a layer, the first and last norms, the output head, sampling
    if [ -z "$ncu" ]; then
        say "no ncu on this machine: kernels skipped"
    elif [ "$(left)" -lt 100 ]; then
        say "kernels skipped ($(left)s left)"
    else
        say "kernels: $ncu, one stream, two decode steps"
        CANDELA_PDL=0 timeout "$(at_most 150 $(($(left) / 2)))" $run "$ncu" --clock-control none \
            --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
            --kernel-name "regex:^(skinny_gemm|paged_|rms_norm|add_rms_norm|rotary|sample_rows|silu_mul|write_cache)" \
            --launch-skip $((4 * per_step)) --launch-count $((2 * per_step)) -f -o "$work/decode-ncu" \
            "$bin" bench --offline --device "$device" --load-format dummy --model "$config" \
            --tokenizer "$config" --ignore-eos --input-len 16 --output-len 12 --num-prompts 1 \
            --max-concurrency 1 --num-warmups 0 --disable-tqdm >"$work/ncu.log" 2>&1 ||
            say "ncu failed or timed out (see ncu.log)"
        if [ -f "$work/decode-ncu.ncu-rep" ]; then
            timeout 60 "$ncu" --import "$work/decode-ncu.ncu-rep" --csv --print-units base \
                --page details >"$work/ncu-decode.csv" 2>>"$work/ncu.log" ||
                say "ncu could not read its report (see ncu.log)"
            rm -f "$work/decode-ncu.ncu-rep"
        fi
    fi
    checkpoint
fi
has pdl-off && runs_with_server pdl-off \
    "pdl-off:$out_len:$in_len:1 pdl-off:$out_len:$in_len:8" CANDELA_PDL=0
has mma-off && runs_with_server mma-off "mma-off:$in_len:$out_len:1 mma-off:$in_len:$out_len:32" \
    CANDELA_ATTENTION_MMA=0
has skinny-off && runs_with_server skinny-off \
    "skinny-off:$out_len:$in_len:1 skinny-off:$out_len:$in_len:8" CANDELA_SKINNY_GEMM=0
has pool-off && runs_with_server pool-off \
    "pool-off:$in_len:$out_len:32 pool-off:$out_len:$in_len:128" CANDELA_KEEP_FREED_MEMORY=0
say "done"
