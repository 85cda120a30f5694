//! Rotary embedding with the KV-cache write, as a layer of SmolLM2-135M calls it on the CPU (9
//! query heads and 3 KV heads of 64, read in place from the fused qkv rows; an f16 cache): one
//! decoding token and a 128-token prompt chunk, through the fused CPU path (`fused`) and through
//! candle's ops (`candle`: rotary, then the cache write), which it replaced.
//!
//!     cargo bench -p candela-kernels --bench rotary

use candela_kernels::{reshape_and_cache, rotary_and_cache, rotary_embedding, RopeLayout};
use candle_core::{DType, Device, Result, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let (heads, kv_heads, head_dim) = (9, 3, 64);
    let mut group = c.benchmark_group("rotary_and_cache_cpu");
    for tokens in [1, 128] {
        let qkv = Tensor::randn(0f32, 1., (tokens, heads + 2 * kv_heads, head_dim), &dev).unwrap();
        let q = qkv.narrow(1, 0, heads).unwrap();
        let k = qkv.narrow(1, heads, kv_heads).unwrap();
        let v = qkv.narrow(1, heads + kv_heads, kv_heads).unwrap();
        let angles = Tensor::rand(-3f32, 3., (tokens, head_dim / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let cache = || Tensor::zeros((64, 16, kv_heads, head_dim), DType::F16, &dev).unwrap();
        let (k_cache, v_cache) = (cache(), cache());
        let slots: Vec<u32> = (0..tokens as u32).map(|t| (t * 7) % 1024).collect();
        let slots = Tensor::new(slots, &dev).unwrap();
        let layout = RopeLayout::Interleaved;
        group.bench_function(BenchmarkId::new("fused", tokens), |b| {
            b.iter(|| {
                rotary_and_cache(&q, &k, &v, &cos, &sin, layout, &k_cache, &v_cache, &slots)
                    .unwrap()
            })
        });
        let plain = || -> Result<Tensor> {
            let (q, k) = rotary_embedding(&q, &k, &cos, &sin, layout)?;
            reshape_and_cache(&k, &v, &k_cache, &v_cache, &slots)?;
            Ok(q)
        };
        group.bench_function(BenchmarkId::new("candle", tokens), |b| {
            b.iter(|| plain().unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
