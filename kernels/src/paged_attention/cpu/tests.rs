//! The CPU kernel against the reference, per instruction set, path (a token at a time, split
//! contexts, prompt tiles) and cache dtype.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::{paged_attention, paged_attention_reference, reshape_and_cache, AttentionMeta};

/// Two sequences, one mid-prefill over a cached prefix and one decoding, blocks out of order,
/// at several head sizes and GQA ratios (groups of 1 to 7 query heads), with every
/// instruction set this CPU has. Contexts of 10 to 83 positions end runs of 8, 16 and 32
/// positions at every offset.
#[test]
fn cpu_kernel_matches_reference() -> Result<()> {
    for (heads, kv_heads, d, bs) in [
        (3, 3, 16, 4),
        (4, 2, 16, 4),
        (7, 1, 32, 8),
        (9, 3, 64, 16),
        (8, 2, 128, 16),
        (4, 1, 256, 8),
    ] {
        for cache in [DType::F32, DType::F16] {
            check(heads, kv_heads, d, bs, cache)?;
        }
    }
    Ok(())
}

/// A decoding row over a long context is split into parts, which merge to the reference.
#[test]
fn long_contexts_split_into_parts() -> Result<()> {
    let dev = Device::Cpu;
    let (heads, kv_heads, d, bs, n) = (9, 3, 64, 16, 1001usize);
    let nb = n.div_ceil(bs) + 3;
    // The sequence's blocks in reverse order, after three unused ones.
    let table: Vec<u32> = (3..nb as u32).rev().collect();
    let slots: Vec<u32> = (0..n)
        .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
        .collect();
    for cache in [DType::F32, DType::F16] {
        let k_cache = Tensor::zeros((nb, bs, kv_heads, d), cache, &dev)?;
        let v_cache = Tensor::zeros((nb, bs, kv_heads, d), cache, &dev)?;
        let k = Tensor::randn(0f32, 1., (n, kv_heads, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (n, kv_heads, d), &dev)?;
        let slots = Tensor::new(slots.as_slice(), &dev)?;
        reshape_and_cache(&k, &v, &k_cache, &v_cache, &slots)?;
        let seqs = vec![SeqAttention {
            query_start: 0,
            query_len: 1,
            context_len: n,
            block_table: table.clone(),
            prompt_len: 7,
        }];
        let q = (Tensor::randn(0f32, 1., (1, heads, d), &dev)? * 3.)?;
        let scale = 1. / (d as f32).sqrt();
        let reference = paged_attention_reference(&q, &k_cache, &v_cache, &seqs, scale)?;
        let meta = AttentionMeta::new(seqs);
        let out = paged_attention(&q, &k_cache, &v_cache, &meta, scale)?;
        let (diff, bound) = difference(&out, &reference)?;
        assert!(
            diff < bound,
            "{cache:?} cache: max abs diff {diff}, bound {bound}"
        );
    }
    Ok(())
}

/// Tables that name blocks past the cache, or too few blocks, are refused: the kernels read
/// rows through raw offsets.
#[test]
fn tables_outside_the_cache_are_refused() -> Result<()> {
    let dev = Device::Cpu;
    let cache = Tensor::zeros((4, 4, 1, 16), DType::F32, &dev)?;
    let q = Tensor::zeros((1, 2, 16), DType::F32, &dev)?;
    for (table, context_len) in [(vec![1u32, 4], 6), (vec![0u32], 6)] {
        let meta = AttentionMeta::new(vec![SeqAttention {
            query_start: 0,
            query_len: 1,
            context_len,
            block_table: table.clone(),
            prompt_len: 0,
        }]);
        let got = paged_attention(&q, &cache, &cache, &meta, 0.25);
        assert!(got.is_err(), "table {table:?} for {context_len} positions");
    }
    Ok(())
}

/// Prompt chunks, which go in blocks: one over a cached prefix (ending tiles of positions
/// mid-way and crossing them with its causal edge), a whole prompt and a short one; a
/// preempted sequence recomputing the end of its prompt and tokens it had generated, which
/// go a token at a time; and a decoding row, in one step. Then the same rows all a token at
/// a time.
#[test]
fn prompt_chunks_match_reference() -> Result<()> {
    // Blocks of even sizes, as large as a block's query vectors or the workers allow.
    assert_eq!(tiled::block_tokens(128, 3, usize::MAX), 19);
    assert_eq!(tiled::block_tokens(128, 3, 4), 4);
    assert_eq!(tiled::block_tokens(37, 8, usize::MAX), 8);
    assert_eq!(tiled::block_tokens(5, 1, 0), 1);
    let prompts = [
        (37, 150, 150),
        (70, 70, 70),
        (3, 40, 40),
        (30, 120, 100),
        (1, 90, 60),
    ];
    let tokens = prompts.map(|(query_len, context_len, _)| (query_len, context_len, 0));
    for (heads, kv_heads, d, bs) in [(9, 3, 64, 16), (8, 2, 128, 16), (7, 1, 32, 8)] {
        for cache in [DType::F32, DType::F16] {
            check_batch(heads, kv_heads, d, bs, cache, &prompts)?;
            check_batch(heads, kv_heads, d, bs, cache, &tokens)?;
        }
    }
    Ok(())
}

/// A prompt's attention is the same to the bit whether it goes in one step or in chunks of
/// any size (one token included, as where all but the last token was cached), beside a
/// decoding row or not: a greedy answer must not depend on the batch it was computed in.
#[test]
fn prompt_attention_does_not_depend_on_chunking() -> Result<()> {
    let n = 150;
    for cache in [DType::F32, DType::F16] {
        let c = Sequence::random(n, cache)?;
        let step = |start: usize, end: usize, decoding: bool| -> Result<Tensor> {
            let mut seqs = vec![SeqAttention {
                query_start: 0,
                query_len: end - start,
                context_len: end,
                block_table: c.table.clone(),
                prompt_len: n,
            }];
            let mut q_rows = c.q.narrow(0, start, end - start)?;
            if decoding {
                seqs.push(SeqAttention {
                    query_start: end - start,
                    query_len: 1,
                    context_len: 40,
                    block_table: c.table.clone(),
                    prompt_len: 20,
                });
                q_rows = Tensor::cat(&[&q_rows, &c.q.narrow(0, 0, 1)?], 0)?;
            }
            let meta = AttentionMeta::new(seqs);
            let out = paged_attention(&q_rows, &c.k_cache, &c.v_cache, &meta, c.scale)?;
            out.narrow(0, 0, end - start)
        };
        let whole = step(0, n, false)?;
        for cuts in [&[1usize, 2, 9, 73, 149][..], &[64, 128], &[33, 34, 140]] {
            let mut parts = Vec::new();
            let mut start = 0;
            for (i, &end) in cuts.iter().chain([&n]).enumerate() {
                parts.push(step(start, end, i % 2 == 1)?);
                start = end;
            }
            let chunked = Tensor::cat(&parts, 0)?;
            assert!(
                bit_equal(&whole, &chunked)?,
                "{cache:?} cache, chunks ending at {cuts:?}"
            );
        }
    }
    Ok(())
}

/// A generated token's attention is the same to the bit decoded alone, beside fifteen long
/// decoding rows, and recomputed after a preemption together with the end of its prompt:
/// the recomputed text must be the text the sequence had. Its context's split into parts
/// ([`PART`]) depends on nothing else in the step.
#[test]
fn a_tokens_attention_does_not_depend_on_its_batch() -> Result<()> {
    let (n, prompt_len) = (700, 100);
    for cache in [DType::F32, DType::F16] {
        let c = Sequence::random(n, cache)?;
        let seq = |query_start: usize, start: usize, end: usize| SeqAttention {
            query_start,
            query_len: end - start,
            context_len: end,
            block_table: c.table.clone(),
            prompt_len,
        };
        // Sequence rows `start..end`, then `others` decoding rows at 600 positions.
        let step = |start: usize, end: usize, others: usize| -> Result<Tensor> {
            let mut seqs = vec![seq(0, start, end)];
            let mut rows = vec![c.q.narrow(0, start, end - start)?];
            for i in 0..others {
                seqs.push(seq(end - start + i, 599, 600));
                rows.push(c.q.narrow(0, i, 1)?);
            }
            let out = paged_attention(
                &Tensor::cat(&rows, 0)?,
                &c.k_cache,
                &c.v_cache,
                &AttentionMeta::new(seqs),
                c.scale,
            )?;
            out.narrow(0, 0, end - start)
        };
        let recomputed = step(90, n, 1)?;
        let prompt = step(0, prompt_len, 0)?;
        assert!(
            bit_equal(&recomputed.narrow(0, 0, 10)?, &prompt.narrow(0, 90, 10)?)?,
            "{cache:?} cache: the prompt's end recomputed"
        );
        for p in [100, 101, 255, 256, 257, 511, 512, 600, 699] {
            let alone = step(p, p + 1, 0)?;
            let batched = step(p, p + 1, 15)?;
            assert!(
                bit_equal(&alone, &batched)?,
                "{cache:?} cache: position {p} batched"
            );
            let again = recomputed.narrow(0, p - 90, 1)?;
            assert!(
                bit_equal(&alone, &again)?,
                "{cache:?} cache: position {p} recomputed"
            );
        }
    }
    Ok(())
}

/// One sequence of SmolLM2's attention shape (9 heads over 3 KV heads of 64) over a random
/// cache, its blocks in reverse order, with a query for each of its positions.
struct Sequence {
    table: Vec<u32>,
    k_cache: Tensor,
    v_cache: Tensor,
    q: Tensor,
    scale: f32,
}

impl Sequence {
    fn random(positions: usize, cache: DType) -> Result<Self> {
        let dev = Device::Cpu;
        let (heads, kv_heads, d, bs) = (9, 3, 64, 16);
        let nb = positions.div_ceil(bs) + 2;
        let random = || Tensor::randn(0f32, 1., (nb, bs, kv_heads, d), &dev)?.to_dtype(cache);
        Ok(Self {
            table: (0..nb as u32).rev().collect(),
            k_cache: random()?,
            v_cache: random()?,
            q: (Tensor::randn(0f32, 1., (positions, heads, d), &dev)? * 3.)?,
            scale: 1. / (d as f32).sqrt(),
        })
    }
}

fn bit_equal(a: &Tensor, b: &Tensor) -> Result<bool> {
    Ok(a.eq(b)?.flatten_all()?.min(0)?.to_scalar::<u8>()? == 1)
}

/// The reference reads the same cache, widened to f32: the kernels must match it to f32
/// rounding whatever the cache holds.
fn check(heads: usize, kv_heads: usize, d: usize, bs: usize, cache: DType) -> Result<()> {
    let shape = [(5, 5 * bs + 3, 0), (1, bs + 2, 3)];
    check_batch(heads, kv_heads, d, bs, cache, &shape)
}

/// [`check`] for sequences of `(query_len, context_len, prompt_len)`, their blocks spread out
/// of order over a cache with unused blocks.
fn check_batch(
    heads: usize,
    kv_heads: usize,
    d: usize,
    bs: usize,
    cache: DType,
    shape: &[(usize, usize, usize)],
) -> Result<()> {
    let dev = Device::Cpu;
    let needed: usize = shape.iter().map(|&(_, n, _)| n.div_ceil(bs)).sum();
    let nb = needed + 3;
    // A stride coprime to the cache's size scatters the blocks.
    let stride = (2..)
        .find(|s| gcd(*s, nb) == 1 && *s > nb / 3)
        .expect("a stride");
    let mut next = 0;
    let tables: Vec<Vec<u32>> = shape
        .iter()
        .map(|&(_, n, _)| {
            (0..n.div_ceil(bs))
                .map(|_| {
                    next += 1;
                    (next * stride % nb) as u32
                })
                .collect()
        })
        .collect();
    let lens: Vec<usize> = shape.iter().map(|&(_, n, _)| n).collect();
    let k_cache = Tensor::zeros((nb, bs, kv_heads, d), cache, &dev)?;
    let v_cache = Tensor::zeros((nb, bs, kv_heads, d), cache, &dev)?;
    // Fill the caches with a full history for every sequence.
    for (table, &len) in tables.iter().zip(&lens) {
        let slots: Vec<u32> = (0..len)
            .map(|p| table[p / bs] * bs as u32 + (p % bs) as u32)
            .collect();
        let k = Tensor::randn(0f32, 1., (len, kv_heads, d), &dev)?;
        let v = Tensor::randn(0f32, 1., (len, kv_heads, d), &dev)?;
        reshape_and_cache(
            &k,
            &v,
            &k_cache,
            &v_cache,
            &Tensor::new(slots.as_slice(), &dev)?,
        )?;
    }
    let mut query_start = 0;
    let seqs: Vec<SeqAttention> = shape
        .iter()
        .zip(&tables)
        .map(|(&(query_len, context_len, prompt_len), table)| {
            query_start += query_len;
            SeqAttention {
                query_start: query_start - query_len,
                query_len,
                context_len,
                block_table: table.clone(),
                prompt_len,
            }
        })
        .collect();
    let q = (Tensor::randn(0f32, 1., (query_start, heads, d), &dev)? * 3.)?;
    let scale = 1. / (d as f32).sqrt();
    let reference = paged_attention_reference(&q, &k_cache, &v_cache, &seqs, scale)?;
    let meta = AttentionMeta::new(seqs.clone());
    let mut runs = vec![(
        "dispatch".to_string(),
        paged_attention(&q, &k_cache, &v_cache, &meta, scale)?,
    )];
    // Parts of at most 4 positions split every context into parts of a few positions,
    // ending runs at every offset; sixteen workers make tiled blocks of a token or two.
    let many = rayon::ThreadPoolBuilder::new()
        .num_threads(16)
        .build()
        .map_err(candle_core::Error::wrap)?;
    for tier in tiers() {
        for (part, tile_all) in [(PART, false), (4, false), (4, true)] {
            let op = CpuPagedAttention {
                seqs: &seqs,
                scale,
                tier,
                part,
                tile_all,
            };
            let out = many.install(|| q.apply_op3_no_bwd(&k_cache, &v_cache, &op))?;
            runs.push((
                format!("{tier:?}, parts of {part}, all tiled: {tile_all}"),
                out,
            ));
        }
    }
    for (name, out) in runs {
        let (diff, bound) = difference(&out, &reference)?;
        assert!(
            diff < bound,
            "{name}, {cache:?} cache, {heads}:{kv_heads} heads of {d}, {shape:?}: \
             max abs diff {diff}, bound {bound}"
        );
    }
    Ok(())
}

/// The largest difference from the reference, and the bound it must stay under: 1e-5 of the
/// reference's largest value (or of 1). The kernels sum in another order than the reference,
/// and a context split into parts of a few positions merges each part's running maximum and
/// sum again, so rounding grows with the outputs' size: over 7,200 random checks of 3 to 5 in
/// size the largest error was 4.2e-6 of it.
fn difference(out: &Tensor, reference: &Tensor) -> Result<(f32, f32)> {
    let largest = |t: Tensor| -> Result<f32> { t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>() };
    let diff = largest((out - reference)?)?;
    Ok((diff, 1e-5 * largest(reference.clone())?.max(1.)))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
