//! The CPU paged-attention kernel at SmolLM2-135M's shape (9 query heads over 3 KV heads of 64)
//! and Llama-3.1-8B's (32 over 8, of 128): a decode step of sixteen sequences at 256 and 1024
//! tokens of context, one sequence's at 1024 and 4096, and a 128-token prompt chunk alone and at
//! the end of a 4096-token prompt; over an f32 cache and an f16 one (the
//! server's default on the CPU). Those caches stay in the CPU's caches from call to call; "decode
//! x16, 30 layers" (and "decode x1, 30 layers" at 4096) reads SmolLM2's 30 layers' caches in
//! turn, out of memory, as a server's step does (their blocks scattered over a pool four times
//! the size they need).
//!
//!     cargo bench -p candela-kernels --bench attention

use candela_kernels::{paged_attention, AttentionMeta, SeqAttention};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

const BLOCK: usize = 16;

/// A batch of `seqs` sequences, each with `query_len` new tokens at the end of `context`
/// tokens, over caches holding every sequence's blocks (interleaved, as a busy pool hands them
/// out).
fn batch(seqs: usize, query_len: usize, context: usize) -> AttentionMeta {
    let blocks = context.div_ceil(BLOCK);
    AttentionMeta::new(
        (0..seqs)
            .map(|s| SeqAttention {
                query_start: s * query_len,
                query_len,
                context_len: context,
                block_table: (0..blocks).map(|b| (b * seqs + s) as u32).collect(),
                prompt_len: if query_len > 1 { context } else { 0 },
            })
            .collect(),
    )
}

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut group = c.benchmark_group("paged_attention_cpu");
    for (shape, heads, kv_heads, head_dim) in [("smollm2", 9, 3, 64), ("llama-8b", 32, 8, 128)] {
        for (work, seqs, query_len, context) in [
            ("decode x16", 16, 1, 256),
            ("decode x16", 16, 1, 1024),
            ("decode x1", 1, 1, 1024),
            ("prefill", 1, 128, 128),
            ("decode x1", 1, 1, 4096),
            ("prefill", 1, 128, 4096),
        ] {
            let meta = batch(seqs, query_len, context);
            let blocks = seqs * context.div_ceil(BLOCK);
            let cache = || Tensor::randn(0f32, 1., (blocks, BLOCK, kv_heads, head_dim), &dev);
            let (k, v) = (cache().unwrap(), cache().unwrap());
            let q = Tensor::randn(0f32, 1., (seqs * query_len, heads, head_dim), &dev).unwrap();
            let scale = (head_dim as f32).powf(-0.5);
            // Query-key pairs scored (causal for the prompt chunk).
            let pairs = seqs * (context - query_len..context).map(|p| p + 1).sum::<usize>();
            group.throughput(Throughput::Elements((pairs * heads) as u64));
            for dtype in [DType::F32, DType::F16] {
                let (k, v) = (k.to_dtype(dtype).unwrap(), v.to_dtype(dtype).unwrap());
                let name = format!("{shape} {work} {dtype:?}");
                group.bench_function(BenchmarkId::new(name, context), |b| {
                    b.iter(|| paged_attention(&q, &k, &v, &meta, scale).unwrap())
                });
            }
        }
    }
    thirty_layers(&mut group, 16, 256);
    thirty_layers(&mut group, 1, 4096);
    group.finish();
}

/// A decode step of `seqs` sequences at `context` tokens over 30 layers' f16 caches, each four
/// times the size the sequences need (377 MB in all for 16 at 256, or 1 at 4096).
fn thirty_layers(
    group: &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>,
    seqs: usize,
    context: usize,
) {
    let dev = Device::Cpu;
    let (heads, kv_heads, head_dim) = (9, 3, 64);
    let (blocks, pool) = (context / BLOCK, 4 * seqs * context / BLOCK);
    let meta = AttentionMeta::new(
        (0..seqs)
            .map(|s| SeqAttention {
                query_start: s,
                query_len: 1,
                context_len: context,
                // A stride coprime to the pool's size spreads each sequence over all of it.
                block_table: (0..blocks)
                    .map(|b| ((b * seqs + s) * 7 % pool) as u32)
                    .collect(),
                prompt_len: 0,
            })
            .collect(),
    );
    let cache = || {
        Tensor::randn(0f32, 1., (pool, BLOCK, kv_heads, head_dim), &dev)
            .and_then(|t| t.to_dtype(DType::F16))
            .unwrap()
    };
    let layers: Vec<(Tensor, Tensor)> = (0..30).map(|_| (cache(), cache())).collect();
    let q = Tensor::randn(0f32, 1., (seqs, heads, head_dim), &dev).unwrap();
    let scale = (head_dim as f32).powf(-0.5);
    group.throughput(Throughput::Elements((30 * seqs * context * heads) as u64));
    group.bench_function(
        BenchmarkId::new(format!("smollm2 decode x{seqs}, 30 layers F16"), context),
        |b| {
            b.iter(|| {
                for (k, v) in &layers {
                    paged_attention(&q, k, v, &meta, scale).unwrap();
                }
            })
        },
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
