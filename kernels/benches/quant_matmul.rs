//! The CPU quantized matmul at SmolLM2-135M's shapes: decoding one sequence and sixteen (one
//! int8 term per row), and a prompt chunk of 256 tokens (two terms) beside an f32 GEMM over the
//! dequantized weights; then a decode step's projections through all 30 layers, whose weights
//! come from memory (`HOT=1` repeats the first layer's instead, which stay in cache: the
//! difference is the time spent waiting for memory); then GGUF's K-quants at Llama-3.2-1B's FFN
//! shape, Q6_K in its 6-bit panels against int8 blocks of the same values, and Q4_K in its own
//! panels.
//!
//!     cargo bench -p candela-kernels --bench quant_matmul
//!     COPIES=40 cargo bench -p candela-kernels --bench quant_matmul -- _k    (K-quants from memory)

use candela_kernels::QMatrix;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    // (name, rows, cols): an FFN up projection in GGUF Q4_1, the tied output head in int8.
    let shapes = [
        ("q4_1 1536x576", 1536, 576),
        ("q4_1 576x1536", 576, 1536),
        ("q8 49152x576", 49152, 576),
    ];
    let mut group = c.benchmark_group("quant_matmul");
    for (name, rows, cols) in shapes {
        let w = Tensor::randn(0f32, 1., (rows, cols), &dev).unwrap();
        let q = if name.starts_with("q4_1") {
            let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
            QMatrix::from_q4_1(&qt.data().unwrap(), rows, cols).unwrap()
        } else {
            QMatrix::from_tensor(&w).unwrap()
        };
        let dense = if name.starts_with("q4_1") {
            QTensor::quantize(&w, GgmlDType::Q4_1)
                .unwrap()
                .dequantize(&dev)
                .unwrap()
        } else {
            w.clone()
        };
        let xt = Tensor::randn(0f32, 1., (256, cols), &dev).unwrap();
        group.throughput(Throughput::Elements((256 * rows * cols) as u64));
        group.bench_function(BenchmarkId::new(format!("{name} f32 gemm"), 256), |b| {
            b.iter(|| xt.matmul(&dense.t().unwrap()).unwrap())
        });
        for m in [1usize, 16, 256] {
            let x: Vec<f32> = Tensor::randn(0f32, 1., (m, cols), &dev)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            group.throughput(Throughput::Elements((m * rows * cols) as u64));
            group.bench_with_input(BenchmarkId::new(name, m), &m, |b, &m| {
                b.iter(|| q.matmul(&x, &vec![m > 16; m]))
            });
        }
    }
    // One decode step's projections through every layer (30 layers of SmolLM2, 66 MB of Q4_1,
    // more than the last-level cache), so the weights come from memory as they do in serving.
    // Throughput in bytes: compare with the machine's read bandwidth.
    let layers: Vec<Vec<QMatrix>> = (0..30)
        .map(|_| {
            [(960, 576), (576, 576), (3072, 576), (576, 1536)]
                .map(|(rows, cols)| {
                    let w = Tensor::randn(0f32, 1., (rows, cols), &dev).unwrap();
                    let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
                    QMatrix::from_q4_1(&qt.data().unwrap(), rows, cols).unwrap()
                })
                .into()
        })
        .collect();
    let bytes: usize = layers.iter().flatten().map(QMatrix::bytes).sum();
    group.throughput(Throughput::Bytes(bytes as u64));
    let hot = std::env::var_os("HOT").is_some();
    for m in [1usize, 16] {
        let x: Vec<f32> = (0..m * 1536).map(|i| (i as f32 * 0.37).sin()).collect();
        let precise = vec![false; m];
        group.bench_with_input(
            BenchmarkId::new("decode pass, 30 layers", m),
            &m,
            |b, &m| {
                // On a worker of the pool, as the engine runs its forward passes.
                b.iter(|| {
                    rayon::scope(|_| {
                        for w in (0..30).flat_map(|l| &layers[if hot { 0 } else { l }]) {
                            let x = &x[..m * w.cols()];
                            std::hint::black_box(w.matmul(x, &precise));
                        }
                    })
                })
            },
        );
    }
    // Llama-3.2-1B's FFN down projection (2048x8192) as a Q4_K_M file has it in half its layers,
    // Q6_K, in the 6-bit panels it keeps, against the same values in int8 blocks (how every type
    // but Q4 went before), and in Q4_K (in Q4_K panels); four copies of each, 39-76 MB, read in
    // turn (`COPIES=N` sets how many: this machine's last-level cache may hold four). Throughput
    // in bytes read.
    let (rows, cols) = (2048, 8192);
    let copies: usize = std::env::var("COPIES").map_or(4, |v| v.parse().expect("COPIES: a count"));
    let w = Tensor::randn(0f32, 1., (rows, cols), &dev).unwrap();
    let q6 = QTensor::quantize(&w, GgmlDType::Q6K).unwrap();
    let q4 = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
    let kept = |qt: &QTensor| {
        let bytes = qt.data().unwrap();
        QMatrix::from_gguf_blocks(qt.dtype(), &bytes, rows, cols)
            .unwrap()
            .unwrap()
    };
    let int8 = |qt: &QTensor| QMatrix::from_tensor(&qt.dequantize(&dev).unwrap()).unwrap();
    let kinds: [(&str, Vec<QMatrix>); 3] = [
        (
            "q6_k 2048x8192 x4",
            (0..copies).map(|_| kept(&q6)).collect(),
        ),
        (
            "q6_k as int8 2048x8192 x4",
            (0..copies).map(|_| int8(&q6)).collect(),
        ),
        (
            "q4_k 2048x8192 x4",
            (0..copies).map(|_| kept(&q4)).collect(),
        ),
    ];
    for (label, matrices) in &kinds {
        let bytes: usize = matrices.iter().map(QMatrix::bytes).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        // One decoding row, 16, and a 128-token prompt chunk (in two terms where VNNI makes
        // them cheap, as `serve` takes prompts by default).
        for m in [1usize, 16, 128] {
            let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let precise = vec![m == 128 && candela_kernels::quant_has_vnni(); m];
            group.bench_with_input(BenchmarkId::new(*label, m), &m, |b, _| {
                b.iter(|| {
                    rayon::scope(|_| {
                        for q in matrices {
                            std::hint::black_box(q.matmul(&x, &precise));
                        }
                    })
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
