#!/usr/bin/env bash
# Builds the `--features cuda` binary on a machine without a GPU or a system CUDA, against a
# CUDA toolkit installed from PyPI wheels, and leaves a stripped copy to carry to a GPU machine.
#
#   bash scripts/cuda-build.sh   -> target/cuda/candela-gpu (stripped) and candela-gpu.gz,
#                                   target/cuda/kernels-test.gz and models-test.gz (the CUDA
#                                   tests of candela-kernels and candela-models)
#
# On the GPU machine (CUDA driver, no Rust): gunzip -c target/cuda/candela-gpu.gz >candela-gpu;
#   chmod +x candela-gpu; bash scripts/gpu/run.sh ./candela-gpu serve --device cuda:0
#   (run.sh puts PyTorch's CUDA libraries on the loader path); scripts/gpu-bench.sh measures.
#
# Environment:
#   CUDA_WHEELS_CACHE   where the toolkit wheels go (default ~/.cache/candela-cuda; reused)
#   CUDA_TOOLKIT        toolkit release (default 13.0.2: PTX from a newer nvcc than the driver's
#                       CUDA version would not load on a CUDA 13.0 driver)
#   CUDA_COMPUTE_CAP    target SM (default 90: H100/H200)
# Needs python3 with pip, gcc/g++ (nvcc's host compiler) and about 1.5 GiB of disk for the
# toolkit. A clean build takes about 15 minutes on 2 cores; later ones are incremental.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cache="${CUDA_WHEELS_CACHE:-$HOME/.cache/candela-cuda}"
release="${CUDA_TOOLKIT:-13.0.2}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
wheels="$cache/pkgs-$release"
root="$wheels/nvidia/cu${release%%.*}"
say() { echo "cuda-build: $*" >&2; }

command -v g++ >/dev/null || { say "needs g++ (nvcc's host compiler)"; exit 1; }

# 1. The toolkit (nvcc, runtime, cuBLAS, cuRAND, NVRTC, headers) from NVIDIA's wheels.
if [ ! -x "$root/bin/nvcc" ]; then
    say "installing the CUDA $release toolkit wheels into $wheels"
    rm -rf "$wheels.partial"
    mkdir -p "$cache"
    python3 -m pip install --quiet --disable-pip-version-check --no-compile \
        --target "$wheels.partial" \
        "cuda-toolkit[nvcc,cudart,cublas,curand,nvrtc,cccl,crt,nvvm]==$release"
    mv "$wheels.partial" "$wheels"
fi

# 2. The layout build scripts expect of a CUDA root: lib64, and unversioned .so names to link.
[ -e "$root/lib64" ] || ln -s lib "$root/lib64"
for lib in "$root"/lib/lib*.so.*; do
    name=${lib##*/}
    case $name in *.alt.* | *builtins*) continue ;; esac
    [ -e "$root/lib/${name%%.so.*}.so" ] || ln -s "$name" "$root/lib/${name%%.so.*}.so"
done

# 3. A libcuda.so to link against: the driver library comes with the GPU machine's driver, so
#    here every driver entry point named in the headers returns CUDA_ERROR_STUB_LIBRARY (34).
stub="$root/lib/stubs"
if [ ! -e "$stub/libcuda.so" ]; then
    mkdir -p "$stub"
    headers=()
    for h in cuda.h cudaGL.h cudaEGL.h cudaVDPAU.h cudaProfiler.h; do
        [ -f "$root/include/$h" ] && headers+=("$root/include/$h")
    done
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "${headers[@]}" | sort -u \
        | sed 's/.*/int &(void) { return 34; }/' >"$stub/libcuda.c"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub/libcuda.so" "$stub/libcuda.c"
    ln -sf libcuda.so "$stub/libcuda.so.1"
fi

export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export PATH="$root/bin:$PATH"
export LIBRARY_PATH="$root/lib:$stub${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$root/lib:$stub${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "$(nvcc --version | tail -1), sm_$CUDA_COMPUTE_CAP"

# 4. The build, in its own target directory so it never invalidates the CPU build.
CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda
strip -o target/cuda/candela-gpu target/cuda/release/candela
# Stripped it is still past 64 MiB (candle's PTX and fatbin kernels); gzipped it is about 20 MB,
# which fits what a session can carry to the GPU machine (gunzip it there).
gzip -9 -c target/cuda/candela-gpu >target/cuda/candela-gpu.gz
say "built target/cuda/candela-gpu ($(du -h target/cuda/candela-gpu | cut -f1)), target/cuda/candela-gpu.gz ($(du -h target/cuda/candela-gpu.gz | cut -f1))"
# It starts here too (CUDA calls fail cleanly on the stub): a smoke check of the binary.
target/cuda/candela-gpu --version

# 5. The unit tests of candela-kernels (each CUDA kernel against plain candle) and of
#    candela-models (the whole forward pass on the GPU against the CPU), for scripts/gpu-bench.sh
#    to run on the GPU (here they skip: no device). Cargo names the test executables in its JSON
#    messages.
for crate in kernels models; do
    test_bin=$(CARGO_TARGET_DIR=target/cuda cargo test --release -p "candela-$crate" --features cuda \
        --lib --no-run --message-format=json | python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
        print(msg["executable"])')
    strip -o "target/cuda/$crate-test" "$test_bin"
    gzip -9 -c "target/cuda/$crate-test" >"target/cuda/$crate-test.gz"
    say "built target/cuda/$crate-test.gz ($(du -h "target/cuda/$crate-test.gz" | cut -f1))"
done
