//! The engine's own CPU cost per step, without a model: scheduling 256 running sequences, the
//! block pool's allocate/free, and incremental detokenization (with the default chat model's
//! tokenizer, fetched into the cache if needed). Run with `cargo bench --bench engine`.

use candela::ids::RequestId;
use candela::kv_cache::BlockPool;
use candela::scheduler::{Priority, SchedRequest, Scheduler, SchedulerConfig};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

/// A scheduler with `n` sequences already past their prompts, decoding.
fn decoding_scheduler(n: usize) -> Scheduler {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: n,
        max_batched_tokens: 8192,
        max_prefill_tokens: 8192,
        num_blocks: n * 64,
        block_size: 16,
    });
    for i in 0..n {
        let prompt: Vec<u32> = (0..200).map(|t| (t * 31 + i as u32) % 50_000).collect();
        s.add(SchedRequest::new(
            RequestId(i as u64),
            prompt,
            Priority::Interactive,
        ));
    }
    let out = s.schedule();
    s.advance(&out);
    for seq in &out.seqs {
        s.append(seq.id, 7);
    }
    s
}

fn scheduler_step(c: &mut Criterion) {
    for n in [16, 256] {
        c.bench_function(&format!("scheduler step, {n} decoding sequences"), |b| {
            b.iter_batched_ref(
                || decoding_scheduler(n),
                |s| {
                    let out = s.schedule();
                    s.advance(&out);
                    for seq in &out.seqs {
                        s.append(seq.id, 9);
                    }
                    out.seqs.len()
                },
                BatchSize::LargeInput,
            )
        });
    }
}

fn block_pool(c: &mut Criterion) {
    c.bench_function("block pool: allocate 64 + release 64", |b| {
        let mut pool = BlockPool::new(16_384);
        b.iter(|| {
            let ids = pool.allocate(64).expect("free blocks");
            pool.release(ids.into_iter().rev());
        })
    });
}

fn detokenizer(c: &mut Criterion) {
    let catalog = candela::catalog::Catalog::builtin();
    let entry = catalog.get("smollm2-135m-instruct").expect("catalog entry");
    let path =
        candela::fetch::fetch(entry, &candela::fetch::candela_home()).expect("model fetched");
    let tokenizer = candela_models::gguf::GgufFile::open(&path)
        .and_then(|g| g.tokenizer())
        .expect("tokenizer");
    let text =
        "The quick brown fox jumps over the lazy dog, and then — naïvely — writes 1234 émojis 🦊. "
            .repeat(16);
    let ids = tokenizer
        .encode(text.as_str(), false)
        .expect("encodes")
        .get_ids()
        .to_vec();
    c.bench_function(
        &format!("detokenize {} tokens one at a time", ids.len()),
        |b| {
            b.iter(|| {
                let mut d = candela::serving::Detokenizer::new(&[]);
                ids.iter()
                    .map(|&t| d.push(&tokenizer, t).len())
                    .sum::<usize>()
            })
        },
    );
}

criterion_group!(benches, scheduler_step, block_pool, detokenizer);
criterion_main!(benches);
