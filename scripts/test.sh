#!/usr/bin/env bash
# The project's test command: bash scripts/test.sh  (run from anywhere; works in the repo root)
#
#   1. Python venv at .venv with openai, anthropic + numpy (installed only when missing)
#   2. cargo build --release, then `candela fetch` (default models into $CANDELA_HOME)
#   3. cargo test --release --workspace (the tests comparing texts once more with AVX2 kernels
#      where the CPU has AVX-512), then the CUDA kernels' tests on the CPU emulator
#      (candela-kernels --features cuda-emu; needs a C++ compiler), in four thread orders, the
#      last under AddressSanitizer + UBSan
#   4. candela serve on a free local port, wait for /health, run scripts/sdk_smoke.py
#
# Environment:
#   CANDELA_HOME  model cache shared by the tests and the server (default: candela's own,
#                 ~/.cache/candela, so that runs on the same machine download nothing)
#   SMOKE_ONLY=1  skip step 3 (quick iteration on the server + SDK smoke test)
#   HEALTH_TIMEOUT seconds to wait for /health (default 120)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
# the server under test is local; never route it through a proxy
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}"
export no_proxy="$NO_PROXY"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/candela"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-120}"

step() { echo; echo "==> $*"; }

# ---- 1. Python venv -------------------------------------------------------
step "python venv (.venv)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ -x "$PY" ] && ! "$PY" -m pip --version >/dev/null 2>&1; then
    echo "broken venv at $VENV (no pip); recreating"
    rm -rf "$VENV"
fi
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
if ! "$PY" -c 'import openai, anthropic, numpy, gguf, safetensors, tokenizers' >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --disable-pip-version-check openai anthropic numpy gguf safetensors tokenizers
fi
"$PY" -c 'import openai, numpy; print("openai", openai.__version__, "numpy", numpy.__version__)'

# ---- 2. build + fetch models ------------------------------------------------
step "cargo build --release"
cargo build --release

step "candela fetch (CANDELA_HOME=${CANDELA_HOME:-default})"
"$BIN" fetch

# A Hugging Face-style Llama directory (safetensors + tokenizer.json), made from the default GGUF,
# for the test of that loading path.
HF_DIR="${CANDELA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/candela}/test-models/smollm2-135m-instruct-hf"
"$PY" scripts/reference/gguf_to_hf.py "$("$BIN" fetch --model smollm2-135m-instruct | cut -f2)" "$HF_DIR"

# ---- 3. Rust tests ----------------------------------------------------------
if [ "${SMOKE_ONLY:-0}" != 1 ]; then
    step "cargo test --release --workspace"
    cargo test --release --workspace
    # The tests that want a text token for token (batched against solo, recomputed after a
    # preemption) again with the kernels an AVX2-only CPU takes: their sums round otherwise,
    # so a batch-dependent order that AVX-512 happens to hide shows there.
    if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
        step "texts that must not depend on the batch, with CANDELA_CPU_KERNELS=avx2"
        CANDELA_CPU_KERNELS=avx2 cargo test --release -p candela --test api --test lifecycle \
            -- solo_runs same_text
    fi
    step "the CUDA kernels on the CPU emulator (cargo test -p candela-kernels --features cuda-emu)"
    if command -v c++ >/dev/null || command -v g++ >/dev/null; then
        cargo test --release -p candela-kernels --features cuda-emu emu
        # A GPU runs a block's threads in no fixed order: the same tests with the emulator
        # resuming threads (and running blocks) last to first, and then in a random order under
        # AddressSanitizer + UBSan (an out-of-bounds or misaligned access stops the test at its
        # line). The sanitized build has its own target folder, so the others stay built.
        step "the same, threads and blocks in reverse order (CANDELA_EMU_ORDER=reverse)"
        CANDELA_EMU_ORDER=reverse cargo test --release -p candela-kernels --features cuda-emu emu
        # Warps drifting apart between block barriers (the other orders keep them in near
        # lockstep, a shuffle or mma at a time): a missing __syncthreads between warps shows.
        step "the same, each warp running ahead to its next block barrier (CANDELA_EMU_ORDER=warp)"
        CANDELA_EMU_ORDER=warp cargo test --release -p candela-kernels --features cuda-emu emu
        if [ -f "$(g++ -print-file-name=libasan.so 2>/dev/null)" ] &&
            [ -f "$(g++ -print-file-name=libubsan.so 2>/dev/null)" ]; then
            step "the same, in random order, under AddressSanitizer + UBSan"
            CANDELA_EMU_ORDER=shuffle CANDELA_EMU_SANITIZE=address,undefined \
                ASAN_OPTIONS=detect_leaks=0 CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/sanitize" \
                cargo test --release -p candela-kernels --features cuda-emu emu
        else
            echo "SKIPPED the sanitized run: g++ has no libasan or libubsan"
        fi
    else
        echo "SKIPPED: no C++ compiler (install g++ to run them)"
    fi
fi

# ---- 4. server + SDK smoke test ---------------------------------------------
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
BASE="http://127.0.0.1:$PORT"
LOG=$(mktemp "${TMPDIR:-/tmp}/candela-serve.XXXXXX.log")
SERVER_PID=""

cleanup() {
    local rc=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -f "$LOG"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log_tail() {
    echo "---- server log (last 80 lines of $LOG) ----"
    tail -n 80 "$LOG" || true
    echo "---- end of server log ----"
}

step "candela serve on $BASE (log: $LOG)"
"$BIN" serve --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
SERVER_PID=$!

health_ok() {
    "$PY" - "$BASE/health" <<'EOF' >/dev/null 2>&1
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 and json.load(r).get("status") == "ok" else 1)
EOF
}

start=$SECONDS
until health_ok; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "server exited before becoming healthy"
        log_tail
        exit 1
    fi
    if (( SECONDS - start >= HEALTH_TIMEOUT )); then
        echo "server not healthy after ${HEALTH_TIMEOUT}s"
        log_tail
        exit 1
    fi
    sleep 1
done
echo "healthy after $((SECONDS - start))s"

step "scripts/sdk_smoke.py $BASE"
if ! "$PY" scripts/sdk_smoke.py "$BASE" --bin "$BIN"; then
    log_tail
    echo "SDK smoke test failed"
    exit 1
fi
