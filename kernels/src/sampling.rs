//! Turning rows of logits into token ids where the logits are, so that on a GPU only the ids
//! cross to the host.
//!
//! Each row has its temperature, top-k, top-p and min-p, and a uniform draw that the caller makes
//! from the sequence's own random stream (so a seeded request is reproducible). The
//! cuts follow the usual definitions: weights `exp((logit - max) / temperature)` are relative to
//! the top token's, min-p keeps weights of at least `min_p`, top-k the `k` heaviest tokens, and
//! top-p the heaviest tokens until they hold `top_p` of the mass top-k left. Each cut keeps the
//! tokens at or above some weight. The CUDA kernel (`cuda/sampling.cu`, a CTA per row) finds
//! that weight without ranking the vocabulary, by radix selection over its float bits (three
//! histogram passes a cut); [`sample_row`], its reference, ranks. Masses are summed in fixed
//! point, exactly, so both take the same cut whatever order they add in. The draw then walks
//! the kept tokens in index order. Tokens tied at a threshold are all kept.

use candle_core::{DType, Result, Tensor};

use crate::isa::{self, plain_tiers};

/// One row's sampling settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowSampling {
    /// At most 1e-5: greedy (the first index of the largest logit).
    pub temperature: f32,
    /// 0: off.
    pub top_k: usize,
    /// 1: off.
    pub top_p: f32,
    /// 0: off.
    pub min_p: f32,
    /// A draw from `[0, 1)`; unused when greedy.
    pub uniform: f32,
}

impl RowSampling {
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        uniform: 0.0,
    };

    fn is_greedy(&self) -> bool {
        self.temperature <= 1e-5
    }
}

/// A token id for each row of `logits` (`[rows, vocab]`, any float dtype): on CUDA by a kernel,
/// elsewhere by [`sample_row`].
pub fn sample(logits: &Tensor, rows: &[RowSampling]) -> Result<Vec<u32>> {
    let (n, vocab) = logits.dims2()?;
    if n != rows.len() {
        candle_core::bail!("sample: {n} rows of logits for {} settings", rows.len());
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    if vocab == 0 {
        candle_core::bail!("sample: empty rows");
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return cuda::sample(logits, rows);
    }
    let logits = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(logits
        .iter()
        .zip(rows)
        .map(|(l, r)| sample_row(l, r))
        .collect())
}

/// The first largest of `logits` and its value. NaN never compares greater, so it never wins;
/// neither does -inf unless all are (then the first).
pub fn argmax(logits: &[f32]) -> (usize, f32) {
    let tier = isa::plain();
    let max = largest(tier, logits);
    if max == f32::NEG_INFINITY {
        return (0, max);
    }
    (first_equal(tier, logits, max), max)
}

/// Lanes of [`largest`] and [`first_equal`]: one AVX-512 register.
const LANES: usize = 16;

plain_tiers! {
    /// The largest of `x`, NaN aside (-inf if there is none).
    fn largest(x: &[f32]) -> f32 = largest_loop
}

#[inline(always)]
fn largest_loop(x: &[f32]) -> f32 {
    // `f32::max` returns the other operand where one is NaN.
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

plain_tiers! {
    /// The index of the first value of `x` equal to `v`, which is one of them.
    fn first_equal(x: &[f32], v: f32) -> usize = first_equal_loop
}

#[inline(always)]
fn first_equal_loop(x: &[f32], v: f32) -> usize {
    // A chunk at a time (compared as one vector), then the first in the chunk that has it.
    let chunks = x.chunks_exact(LANES);
    let tail_start = x.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        let mut hit = false;
        for &l in chunk {
            hit |= l == v;
        }
        if hit {
            return c * LANES + chunk.iter().position(|&l| l == v).unwrap_or(0);
        }
    }
    tail_start + x[tail_start..].iter().position(|&l| l == v).unwrap_or(0)
}

/// A weight's mass in fixed point, as the kernel sums it: `w * 2^40`, truncated. Sums of these
/// are exact in any order (for a vocabulary below 2^23), so the cuts and the draw do not depend
/// on the order a GPU's threads add in.
fn fixed(w: f32) -> u64 {
    (w * (1u64 << 40) as f32) as u64
}

/// One row on the CPU, with the CUDA kernel's definitions: the same weights, cuts, fixed-point
/// masses and draw. The kernel finds each cut's threshold by radix selection; here it is found
/// by ranking the weights, so that the two check each other.
pub fn sample_row(logits: &[f32], row: &RowSampling) -> u32 {
    let (argmax, max) = argmax(logits);
    if row.is_greedy() || max.is_infinite() {
        return argmax as u32;
    }
    let scale_log2 = std::f32::consts::LOG2_E / row.temperature;
    let weights: Vec<f32> = logits
        .iter()
        .map(|&l| {
            let w = ((l - max) * scale_log2).exp2();
            if w.is_nan() {
                0.0
            } else {
                w
            }
        })
        .collect();
    let mut t = 0.0;
    if row.top_k > 0 && row.top_k < logits.len() {
        t = largest_threshold(&weights, 0.0, row.top_k as u64, |_| 1);
    }
    if row.top_p < 1.0 {
        let total: u64 = weights.iter().filter(|&&w| w >= t).map(|&w| fixed(w)).sum();
        let need = (row.top_p as f64 * total as f64).ceil() as u64;
        t = largest_threshold(&weights, t.max(row.min_p), need, fixed);
    } else {
        t = t.max(row.min_p);
    }
    let kept = weights.iter().enumerate().filter(|(_, &w)| w >= t);
    let total: u64 = kept.clone().map(|(_, &w)| fixed(w)).sum();
    let target = (row.uniform as f64 * total as f64).floor() as u64;
    let mut acc = 0;
    for (i, &w) in kept {
        acc += fixed(w);
        if target < acc {
            return i as u32;
        }
    }
    argmax as u32
}

/// Threads of the kernel's CTA: `THREADS` in cuda/sampling.cu.
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emu")))]
const THREADS: u32 = 1024;

/// The rows' settings as the kernel reads them: five floats a row (`Row` in the kernel);
/// top_k, capped at the vocabulary, is exact in an f32 below 2^24.
#[cfg(any(feature = "cuda", all(test, feature = "cuda-emu")))]
fn kernel_settings(rows: &[RowSampling], vocab: usize) -> Vec<f32> {
    rows.iter()
        .flat_map(|r| {
            let top_k = r.top_k.min(vocab) as f32;
            [r.temperature, top_k, r.top_p, r.min_p, r.uniform]
        })
        .collect()
}

/// The largest threshold `t >= lo` (at most 1) whose measure, the sum of `measure(w)` over the
/// weights at or above it, is at least `need`; `lo` when the weights at or above `lo` fall
/// short. Such a `t` is one of the weights: ranked from the top, the first whose running
/// measure (its ties included) reaches `need`.
fn largest_threshold(weights: &[f32], lo: f32, need: u64, measure: impl Fn(f32) -> u64) -> f32 {
    if need == 0 {
        return 1.0;
    }
    let mut ranked: Vec<f32> = weights.iter().copied().filter(|&w| w >= lo).collect();
    ranked.sort_unstable_by(|a, b| b.total_cmp(a));
    let mut acc = 0;
    for (i, &w) in ranked.iter().enumerate() {
        acc += measure(w);
        let last_of_ties = ranked.get(i + 1) != Some(&w);
        if acc >= need && last_of_ties {
            return w;
        }
    }
    lo
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda::cudarc::driver::LaunchConfig;

    use candle_core::{DType, Device, Result, Tensor};

    use super::{kernel_settings, RowSampling, THREADS};
    use crate::cuda as cu;

    pub(super) fn sample(logits: &Tensor, rows: &[RowSampling]) -> Result<Vec<u32>> {
        let (n, vocab) = logits.dims2()?;
        let logits = logits.to_dtype(DType::F32)?.contiguous()?;
        let dev = logits.device().as_cuda_device()?;
        let settings = kernel_settings(rows, vocab);
        let settings =
            Tensor::from_vec(settings, n * 5, &Device::Cpu)?.to_device(logits.device())?;
        let (l_storage, l_layout) = logits.storage_and_layout();
        let (s_storage, s_layout) = settings.storage_and_layout();
        let l_view = cu::view::<f32>(&l_storage, l_layout)?;
        let s_view = cu::view::<f32>(&s_storage, s_layout)?;
        let func = cu::SAMPLING.function(dev, "sample_rows")?;
        // SAFETY: the kernel writes one id per row.
        let mut out = unsafe { dev.alloc::<u32>(n)? };
        let vocab = cu::int(vocab)?;
        let stream = dev.cuda_stream();
        let mut args = cu::Launch::new(&stream, &func);
        args.arg(&mut out).arg(&l_view).arg(&s_view).arg(&vocab);
        let cfg = LaunchConfig {
            grid_dim: (cu::int(n)? as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types and order match `sample_rows` in cuda/sampling.cu.
        unsafe { args.launch(cfg) }?;
        drop((l_storage, s_storage));
        cu::tensor(out, dev, n).to_vec1::<u32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    /// Rows with every combination of temperature (greedy included), top-k, top-p and min-p,
    /// each with its own draw: what the kernel's tests run.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub(super) fn every_cut() -> Vec<RowSampling> {
        (0..48)
            .map(|i| RowSampling {
                temperature: [0.0, 0.6, 1.0, 1.5][i % 4],
                top_k: [0, 1, 40, 1000][i / 4 % 4],
                top_p: [1.0, 0.9, 0.5][i / 16 % 3],
                min_p: if i % 5 == 0 { 0.05 } else { 0.0 },
                uniform: (i as f32 * 0.618_034).fract(),
            })
            .collect()
    }

    /// Rows the kernel must take as the reference does (NaN, all -inf, one finite value, ties),
    /// each with every one of the settings: greedy, all cuts, and a draw at the top of [0, 1).
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    pub(super) fn edge_cases() -> Vec<(Vec<f32>, RowSampling)> {
        let (nan, inf) = (f32::NAN, f32::NEG_INFINITY);
        let rows = [
            vec![nan, 1.0, 2.0, nan, 2.0],
            vec![inf, inf, inf, inf, inf],
            vec![inf, inf, 0.5, inf, inf],
            vec![0.0, 0.0, 0.0, 0.0, 0.0],
        ];
        let settings = [
            RowSampling::GREEDY,
            RowSampling {
                temperature: 1.0,
                top_k: 3,
                top_p: 0.9,
                min_p: 0.1,
                uniform: 0.5,
            },
            RowSampling {
                temperature: 0.7,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                uniform: 0.999_999,
            },
        ];
        settings
            .iter()
            .flat_map(|s| rows.iter().map(move |r| (r.clone(), *s)))
            .collect()
    }

    fn settings(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> RowSampling {
        RowSampling {
            temperature,
            top_k,
            top_p,
            min_p,
            uniform: 0.0,
        }
    }

    /// The nucleus a full ranking gives (the definition the bisection must reproduce).
    fn nucleus(logits: &[f32], s: &RowSampling) -> Vec<usize> {
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let w: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] - max) as f64 / s.temperature as f64).exp())
            .collect();
        let k = if s.top_k == 0 { w.len() } else { s.top_k };
        let total: f64 = w[..k].iter().sum();
        let mut kept = Vec::new();
        let mut acc = 0.0;
        for (&i, &x) in order.iter().zip(&w).take(k) {
            if x < s.min_p as f64 || acc >= s.top_p as f64 * total {
                break;
            }
            acc += x;
            kept.push(i);
        }
        kept
    }

    /// The vectorised argmax against a plain scan for the first largest, on every instruction
    /// set: ties, NaN, infinities and signed zeros, at lengths around a vector's.
    #[test]
    fn argmax_matches_a_scan_on_every_tier() {
        use crate::isa::Tier;
        let scan = |x: &[f32]| {
            x.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                    if l > best.1 {
                        (i, l)
                    } else {
                        best
                    }
                })
        };
        let mut seed = 7u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            seed >> 8
        };
        for len in [0, 1, 5, 15, 16, 17, 31, 33, 100, 49_152] {
            for case in 0..6 {
                let x: Vec<f32> = (0..len)
                    .map(|_| match (case, next() % 8) {
                        (1, 0) => f32::NAN,
                        (2, _) => f32::NEG_INFINITY,
                        (3, r) if r < 4 => f32::NAN,
                        (3, _) => f32::NEG_INFINITY,
                        (4, r) => [0.0, -0.0, 1.0, -1.0][r as usize % 4],
                        (5, 0) => f32::INFINITY,
                        _ => (next() % 200) as f32 / 8.0 - 12.0,
                    })
                    .collect();
                let want = scan(&x);
                for tier in [Tier::Scalar, Tier::Avx2, Tier::Avx512] {
                    let max = largest(tier, &x);
                    let got = if max == f32::NEG_INFINITY {
                        (0, max)
                    } else {
                        (first_equal(tier, &x, max), max)
                    };
                    assert_eq!(got.0, want.0, "len {len} case {case} {tier:?}");
                    assert!(got.1 == want.1, "len {len} case {case} {tier:?}");
                }
                assert_eq!(argmax(&x).0, want.0);
            }
        }
    }

    #[test]
    fn greedy_takes_the_first_largest_and_skips_nan() {
        let l = [1.0, f32::NAN, 3.0, 3.0, -1.0];
        assert_eq!(sample_row(&l, &RowSampling::GREEDY), 2);
        assert_eq!(sample_row(&[f32::NEG_INFINITY; 3], &RowSampling::GREEDY), 0);
        // top_k 1 is greedy whatever the draw (a tie at the top keeps both).
        let s = RowSampling {
            uniform: 0.99,
            ..settings(1.0, 1, 1.0, 0.0)
        };
        assert_eq!(sample_row(&[1.0, f32::NAN, 3.0, 2.9, -1.0], &s), 2);
        assert_eq!(sample_row(&l, &s), 3);
    }

    #[test]
    fn the_draw_walks_the_kept_tokens_in_index_order() {
        // Weights 1/4, 1/2, 1/4 at temperature 1 (ln 2 apart).
        let l2 = std::f32::consts::LN_2;
        let l = [0.0, l2, 0.0];
        for (u, want) in [(0.1, 0), (0.3, 1), (0.7, 1), (0.8, 2), (0.999, 2)] {
            let s = RowSampling {
                uniform: u,
                ..settings(1.0, 0, 1.0, 0.0)
            };
            assert_eq!(sample_row(&l, &s), want, "u {u}");
        }
        // min_p 0.6 keeps only the top token.
        let s = RowSampling {
            uniform: 0.1,
            ..settings(1.0, 0, 1.0, 0.6)
        };
        assert_eq!(sample_row(&l, &s), 1);
    }

    /// Over a large vocabulary, every cut keeps exactly the nucleus that ranking gives, and
    /// the draws land in it in proportion to the weights.
    #[test]
    fn cuts_match_a_full_ranking() {
        let mut next = rng(5);
        let logits: Vec<f32> = (0..3000).map(|_| next() * 12.0).collect();
        for (t, k, p, m) in [
            (0.7, 0, 0.8, 0.0),
            (0.7, 0, 0.5, 0.1),
            (0.7, 0, 1.0, 0.2),
            (1.3, 50, 1.0, 0.0),
            (1.0, 50, 0.6, 0.0),
            (0.5, 200, 0.9, 0.05),
        ] {
            let s = settings(t, k, p, m);
            let want = nucleus(&logits, &s);
            let mut hits = vec![0usize; logits.len()];
            let draws = 1500;
            for _ in 0..draws {
                let tok = sample_row(
                    &logits,
                    &RowSampling {
                        uniform: next(),
                        ..s
                    },
                );
                hits[tok as usize] += 1;
            }
            let drawn: Vec<usize> = (0..logits.len()).filter(|&i| hits[i] > 0).collect();
            assert!(
                drawn.iter().all(|i| want.contains(i)),
                "{s:?}: a draw outside the nucleus"
            );
            let top = want[0];
            let max = logits[top];
            let w = |i: usize| (((logits[i] - max) / t) as f64).exp();
            let share = 1.0 / want.iter().map(|&i| w(i)).sum::<f64>();
            let got = hits[top] as f64 / draws as f64;
            let sd = (share * (1.0 - share) / draws as f64).sqrt();
            assert!(
                (got - share).abs() < 4.0 * sd + 1e-3,
                "{s:?}: top {got} vs {share}"
            );
        }
    }

    #[test]
    fn sample_checks_its_rows() -> Result<()> {
        let logits = Tensor::new(
            &[[0f32, 5.0, 1.0], [3.0, 0.0, 0.0]],
            &candle_core::Device::Cpu,
        )?;
        let rows = [RowSampling::GREEDY; 2];
        assert_eq!(sample(&logits, &rows)?, vec![1, 0]);
        assert!(sample(&logits, &rows[..1]).is_err());
        Ok(())
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use candle_core::{Device, Result, Tensor};

    use super::{sample, sample_row};
    use crate::test_util::cuda_device;

    /// The kernel picks the reference's token for the same draw, over rows of a Llama-3 sized
    /// vocabulary with every kind of cut. The GPU's exp2 may round a weight differently from
    /// the host's, which only matters for a draw right at a boundary; a few such are allowed.
    #[test]
    fn kernel_matches_the_reference() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        let vocab = 128_256;
        let rows = super::tests::every_cut();
        let logits = (Tensor::randn(0f32, 1., (rows.len(), vocab), &Device::Cpu)? * 3.0)?;
        let want: Vec<u32> = logits
            .to_vec2::<f32>()?
            .iter()
            .zip(&rows)
            .map(|(l, r)| sample_row(l, r))
            .collect();
        let got = sample(&logits.to_device(&dev)?, &rows)?;
        let differ = got.iter().zip(&want).filter(|(g, w)| g != w).count();
        assert!(
            differ <= 2,
            "{differ} of {} rows differ: {got:?} vs {want:?}",
            rows.len()
        );
        // Greedy rows match exactly.
        for (i, r) in rows.iter().enumerate() {
            if r.temperature == 0.0 || r.top_k == 1 {
                assert_eq!(got[i], want[i], "row {i}");
            }
        }
        Ok(())
    }

    #[test]
    fn edge_rows() -> Result<()> {
        let Some(dev) = cuda_device() else {
            return Ok(());
        };
        for (row, settings) in super::tests::edge_cases() {
            let want = sample_row(&row, &settings);
            let t = Tensor::new(row.as_slice(), &dev)?.unsqueeze(0)?;
            assert_eq!(sample(&t, &[settings])?, vec![want], "{row:?} {settings:?}");
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "cuda-emu"))]
mod emu_tests {
    use super::{kernel_settings, sample_row, RowSampling, THREADS};
    use crate::emu::{launch, ptr, ptr_mut, Arg};

    fn kernel(logits: &[f32], rows: &[RowSampling]) -> Vec<u32> {
        let vocab = logits.len() / rows.len();
        let settings = kernel_settings(rows, vocab);
        let mut out = vec![u32::MAX; rows.len()];
        let args = [
            ptr_mut(&mut out),
            ptr(logits),
            ptr(&settings),
            Arg::I32(vocab as i32),
        ];
        launch(
            "sample_rows",
            [rows.len() as u32, 1, 1],
            [THREADS, 1, 1],
            &args,
        );
        out
    }

    /// The kernel, run on the CPU emulator (the same exp2 as the reference's), picks exactly
    /// the reference's token for the same draw with every kind of cut: its radix selection
    /// finds the thresholds that ranking finds, and fixed-point masses leave no rounding
    /// boundary. Spread logits; logits of a few values only, where every cut falls among ties;
    /// and logits so far apart that most weights underflow to 0 (counted apart in the kernel).
    #[test]
    fn kernel_matches_the_reference() {
        let vocab = 3000;
        let rows = super::tests::every_cut();
        let mut s = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        let spread: Vec<f32> = (0..rows.len() * vocab)
            .map(|_| next() * 12.0 - 6.0)
            .collect();
        let tied: Vec<f32> = (0..rows.len() * vocab)
            .map(|_| (next() * 6.0).floor() * 0.5)
            .collect();
        let far: Vec<f32> = (0..rows.len() * vocab)
            .map(|_| next() * 400.0 - 200.0)
            .collect();
        for logits in [spread, tied, far] {
            let got = kernel(&logits, &rows);
            let want: Vec<u32> = logits
                .chunks(vocab)
                .zip(&rows)
                .map(|(l, r)| sample_row(l, r))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn edge_rows() {
        for (row, settings) in super::tests::edge_cases() {
            let want = sample_row(&row, &settings);
            assert_eq!(
                kernel(&row, &[settings]),
                vec![want],
                "{row:?} {settings:?}"
            );
        }
    }
}
