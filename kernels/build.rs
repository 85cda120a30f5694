//! With the `cuda-emu` feature, builds the same kernels for the CPU (see `emulator`).
//!
//! With the `cuda` feature, compiles `cuda/*.cu` to PTX in `OUT_DIR` (embedded by `src/cuda.rs`;
//! the driver compiles the PTX for the GPU it finds when a module is first loaded). Without the
//! feature it does nothing, so CPU builds need no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `bin/nvcc` under `$CUDA_ROOT`, `$CUDA_PATH` or `$CUDA_HOME`, else the one
//! on `PATH`. `CUDA_COMPUTE_CAP` (default 90) picks the PTX's virtual architecture, `compute_XX`:
//! the oldest GPU generation that can run it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda-emu")]
    emulator();
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=cuda");
    for var in [
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_HOME",
        "CUDA_COMPUTE_CAP",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    // The host launches kernels that need a newer architecture only where the PTX has them.
    println!("cargo:rustc-env=CANDELA_CUDA_ARCH={}", arch_number(&cap));
    let nvcc = nvcc();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("cuda")
        .expect("kernels/cuda exists")
        .map(|e| e.expect("readable kernels/cuda").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let ptx = out_dir
            .join(src.file_stem().expect("a .cu file has a name"))
            .with_extension("ptx");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on {}", src.display());
        if arch_number(&cap) >= 90 {
            check_waits(&ptx);
        }
    }
}

/// The number at the head of an architecture name: 90 for `90` or `90a` (src/cuda.rs gets it
/// as `CANDELA_CUDA_ARCH`).
fn arch_number(cap: &str) -> u32 {
    let digits: String = cap.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap_or(0)
}

/// From sm_90 the host launches every kernel as a programmatic dependent launch, which is only
/// safe if each kernel waits for the one before (`begin_kernel` in cuda/common.cuh) before it
/// touches memory: checks that every entry point of `ptx` has a `griddepcontrol.wait` and that
/// no load (but of its parameters), store, atomic or async copy comes before it in the text.
/// Prefetches may.
fn check_waits(ptx: &Path) {
    let text = std::fs::read_to_string(ptx).expect("nvcc wrote the PTX");
    for entry in text.split(".entry ").skip(1) {
        let name = entry.split('(').next().unwrap_or(entry).trim();
        let Some(wait) = entry.find("griddepcontrol.wait") else {
            panic!(
                "kernel {name} in {} does not call begin_kernel() (cuda/common.cuh), so it \
                 cannot be launched after another kernel as a dependent launch",
                ptx.display()
            );
        };
        let early = entry[..wait].lines().map(str::trim).find(|line| {
            let op = line.split_whitespace().next().unwrap_or("");
            (op.starts_with("ld.") && !op.starts_with("ld.param"))
                || [
                    "ldu.", "st.", "atom.", "red.", "cp.", "tex.", "suld.", "sust.",
                ]
                .iter()
                .any(|p| op.starts_with(p))
        });
        if let Some(line) = early {
            panic!(
                "kernel {name} in {} touches memory before begin_kernel() (cuda/common.cuh): \
                 `{line}`",
                ptx.display()
            );
        }
    }
}

/// With the `cuda-emu` feature: the kernels of `cuda/*.cu` compiled for the CPU against the
/// stand-in runtime of `emu/`, as a static library the tests launch them from.
#[cfg(feature = "cuda-emu")]
fn emulator() {
    println!("cargo:rerun-if-changed=emu");
    println!("cargo:rerun-if-changed=cuda");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .include("emu/include")
        .include("cuda")
        .flag("-include")
        .flag("emu.h")
        // The kernels reinterpret memory as CUDA code may (16-byte packs of any type).
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-sign-compare");
    // CANDELA_EMU_SANITIZE=address,undefined (any of g++'s -fsanitize= lists) builds the kernels
    // with those sanitizers: an out-of-bounds or misaligned access that a GPU would turn into a
    // wrong number or a fault stops the test here, naming the line.
    println!("cargo:rerun-if-env-changed=CANDELA_EMU_SANITIZE");
    if let Some(list) = env::var("CANDELA_EMU_SANITIZE")
        .ok()
        .filter(|l| !l.is_empty())
    {
        build
            .flag(format!("-fsanitize={list}"))
            .flag("-fno-sanitize-recover=all")
            .flag("-fno-omit-frame-pointer");
        for (sanitizer, runtime) in [("address", "asan"), ("undefined", "ubsan")] {
            if list.split(',').any(|s| s == sanitizer) {
                println!("cargo:rustc-link-lib=dylib={runtime}");
            }
        }
    }
    for file in [
        "runtime",
        "kernels",
        "activation",
        "attention",
        "cache",
        "matmul",
        "norm",
        "rotary",
        "sampling",
    ] {
        build.file(format!("emu/{file}.cpp"));
    }
    build.compile("candela_cuda_emu");
}

fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return nvcc.into();
    }
    ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(env::var_os)
        .map(|root| Path::new(&root).join("bin/nvcc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| "nvcc".into())
}
