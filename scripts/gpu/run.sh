#!/usr/bin/env bash
# Runs a program built with `--features cuda` on a GPU machine whose CUDA libraries (cuBLAS,
# cuRAND, NVRTC, the runtime) come from Python wheels, as PyTorch's nvidia-* packages install
# them, rather than from a system toolkit:
#
#   bash scripts/gpu/run.sh ./candela-gpu serve --device cuda:0
#
# It puts those wheels' lib folders (CUDA 13's shared nvidia/cu13/lib first) on the loader path,
# then /usr/local/cuda/lib64, then the driver's folder where the loader cache lacks libcuda.so.1.
# PYTHON (default python3) names the interpreter whose packages are searched.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PROGRAM [ARGS...]" >&2; exit 64; }

libs=$("${PYTHON:-python3}" - <<'PY' 2>/dev/null || true
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = {os.path.realpath(d) for r in roots for d in glob.glob(os.path.join(r, "*", "lib"))}
print(":".join(sorted(dirs, key=lambda d: ("/cu1" not in d, d))))
PY
)
path="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/cuda/lib64"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    for d in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64; do
        [ -e "$d/libcuda.so.1" ] && { path="$path:$d"; break; }
    done
fi
export LD_LIBRARY_PATH="${path#:}"
exec "$@"
