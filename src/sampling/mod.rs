//! Turning a row of logits into the next token: penalties, temperature, top-k, top-p, min-p,
//! seeded randomness, and the log-probabilities OpenAI's `logprobs` reports.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use candela_kernels::{argmax, exp_nonpositive, RowSampling};

use crate::ids::TokenId;

mod constraint;
pub use constraint::{Constraint, Progress, TokenConstraint};

/// Validated sampling settings of one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 means off.
    pub top_k: usize,
    pub min_p: f32,
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// 1 means off; applies to prompt and output tokens.
    pub repetition_penalty: f32,
    /// Number of top alternatives to report per token, when log-probabilities are wanted.
    pub logprobs: Option<usize>,
    /// Added to these tokens' logits before sampling (OpenAI's `logit_bias`).
    pub logit_bias: Vec<(TokenId, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logprobs: None,
            logit_bias: Vec::new(),
        }
    }
}

/// The chosen token and, when asked for, its log-probability and the top alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: TokenId,
    pub logprob: Option<f32>,
    pub top_logprobs: Vec<(TokenId, f32)>,
}

/// Per-sequence sampling state: the random stream, and a buffer for the vocabulary's weights.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            weights: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// This step's settings for sampling where the logits are (see `candela_kernels::sample`),
    /// with its draw taken from this sequence's random stream as [`Self::sample`] takes it; `None`
    /// when the sequence needs its row on the host: for penalties, which read its tokens, for a
    /// logit bias, or for log-probabilities.
    pub fn device_settings(&mut self) -> Option<RowSampling> {
        let p = &self.params;
        let host_only = p.logprobs.is_some()
            || !p.logit_bias.is_empty()
            || p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0;
        if host_only {
            return None;
        }
        if p.temperature <= 1e-5 {
            return Some(RowSampling::GREEDY);
        }
        Some(RowSampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            uniform: self.rng.random::<f32>(),
        })
    }

    /// Samples from `logits` (modified in place) given the prompt and the output so far.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt: &[TokenId],
        output: &[TokenId],
    ) -> Sampled {
        let p = &self.params;
        let (logprob_of, top_logprobs) = match p.logprobs {
            Some(k) => {
                let lp = log_softmax(logits);
                let top = top_k_indices(&lp, k)
                    .into_iter()
                    .map(|i| (i as TokenId, lp[i]))
                    .collect();
                (Some(lp), top)
            }
            None => (None, Vec::new()),
        };
        self.apply_penalties(logits, prompt, output);
        let token = if self.params.temperature <= 1e-5 {
            argmax(logits).0
        } else {
            self.sample_random(logits)
        };
        Sampled {
            token: token as TokenId,
            logprob: logprob_of.map(|lp| lp[token]),
            top_logprobs,
        }
    }

    /// The penalties, then the logit bias (the log-probabilities reported are the model's own,
    /// from before either).
    fn apply_penalties(&self, logits: &mut [f32], prompt: &[TokenId], output: &[TokenId]) {
        let p = &self.params;
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let mut seen = std::collections::HashSet::new();
            for &t in prompt.iter().chain(output) {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0. {
                            *l / p.repetition_penalty
                        } else {
                            *l * p.repetition_penalty
                        };
                    }
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            let mut counts = std::collections::HashMap::<TokenId, u32>::new();
            for &t in output {
                *counts.entry(t).or_default() += 1;
            }
            for (t, c) in counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
    }

    /// Draws from the temperature-scaled distribution cut by top-k, min-p and top-p, exactly as
    /// ranking the whole vocabulary would cut it, without ranking it: only the cuts need an
    /// order, and only among the few tokens they can keep.
    fn sample_random(&mut self, logits: &[f32]) -> usize {
        let p = &self.params;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature;
        // Weights relative to the top token's (which weighs 1).
        let weight = |l: f32| exp_nonpositive((l - max) * inv_t);
        let (mut ranked, total) = if p.top_k > 0 && p.top_k < logits.len() {
            let ranked: Vec<(usize, f32)> = top_k_indices(logits, p.top_k)
                .into_iter()
                .map(|i| (i, weight(logits[i])))
                .collect();
            let total = ranked.iter().map(|c| c.1).sum::<f32>();
            (ranked, total)
        } else {
            let w = &mut self.weights;
            w.clear();
            w.extend(logits.iter().map(|&l| weight(l)));
            let total = sum(w);
            if p.top_p >= 1.0 {
                // No ranking needed: min-p is a threshold on the weights.
                let floor = p.min_p;
                let kept = if floor > 0.0 {
                    sum_where(w, |x| x >= floor)
                } else {
                    total
                };
                let mut r = self.rng.random::<f32>() * kept;
                let mut last = 0;
                for (i, &x) in w.iter().enumerate().filter(|(_, &x)| x >= floor && x > 0.0) {
                    if r < x {
                        return i;
                    }
                    r -= x;
                    last = i;
                }
                return last;
            }
            // Top-p keeps the best tokens until their mass reaches top_p: every token at or
            // above a weight whose tokens already hold that mass is enough to rank.
            let floor = p.min_p;
            let target = (p.top_p * total).min(sum_where(w, |x| x >= floor));
            let mut t = 1.0f32;
            while t > f32::MIN_POSITIVE && sum_where(w, |x| x >= t.max(floor)) < target {
                t *= 0.25;
            }
            let t = t.max(floor);
            let mut ranked: Vec<(usize, f32)> = w
                .iter()
                .enumerate()
                .filter(|(_, &x)| x >= t && x > 0.0)
                .map(|(i, &x)| (i, x))
                .collect();
            ranked.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            (ranked, total)
        };
        if p.min_p > 0.0 {
            let keep = ranked.iter().take_while(|c| c.1 >= p.min_p).count().max(1);
            ranked.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = ranked
                .iter()
                .position(|c| {
                    acc += c.1 / total;
                    acc >= p.top_p
                })
                .map_or(ranked.len(), |i| i + 1);
            ranked.truncate(keep);
        }
        let kept: f32 = ranked.iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * kept;
        for &(i, x) in &ranked {
            if r < x {
                return i;
            }
            r -= x;
        }
        ranked.last().expect("at least one candidate").0
    }
}

/// Sum with sixteen running totals, so that it vectorises.
fn sum(x: &[f32]) -> f32 {
    sum_where(x, |_| true)
}

fn sum_where(x: &[f32], keep: impl Fn(f32) -> bool) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().filter(|&&v| keep(v)).sum();
    for c in chunks {
        for i in 0..16 {
            acc[i] += if keep(c[i]) { c[i] } else { 0.0 };
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The log-probability of `token` under `logits`, and the `k` likeliest tokens' (a prompt
/// token's entry, where nothing is sampled).
pub fn logprob_of(logits: &[f32], token: TokenId, k: usize) -> (f32, Vec<(TokenId, f32)>) {
    let lp = log_softmax(logits);
    let top = top_k_indices(&lp, k)
        .into_iter()
        .map(|i| (i as TokenId, lp[i]))
        .collect();
    (
        lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
        top,
    )
}

fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = x.iter().map(|v| (v - max).exp()).sum::<f32>().ln() + max;
    x.iter().map(|v| v - lse).collect()
}

/// Indices of the `k` largest values, largest first.
fn top_k_indices(x: &[f32], k: usize) -> Vec<usize> {
    let k = k.min(x.len());
    if k == 0 {
        return Vec::new();
    }
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.select_nth_unstable_by(k - 1, |&a, &b| x[b].total_cmp(&x[a]));
    idx.truncate(k);
    idx.sort_unstable_by(|&a, &b| x[b].total_cmp(&x[a]));
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, 0.5, 2.9]
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[], &[]).token, 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: Some(7),
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20)
                .map(|_| s.sample(&mut logits(), &[], &[]).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        let other = SamplingParams {
            seed: Some(8),
            ..params.clone()
        };
        assert_ne!(run(&params), run(&other));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_cuts_the_tail() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 1,
            seed: Some(1),
            ..Default::default()
        });
        assert!((0..20).all(|_| s.sample(&mut logits(), &[], &[]).token == 1));
        let mut s = Sampler::new(SamplingParams {
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..50 {
            let t = s.sample(&mut logits(), &[], &[]).token;
            assert!(
                t == 1 || t == 4,
                "only the two top tokens cover half the mass, got {t}"
            );
        }
        let mut s = Sampler::new(SamplingParams {
            min_p: 0.5,
            seed: Some(1),
            ..Default::default()
        });
        for _ in 0..50 {
            let t = s.sample(&mut logits(), &[], &[]).token;
            assert!(
                [1, 2, 4].contains(&t),
                "min_p keeps tokens within half of the top probability, got {t}"
            );
        }
    }

    /// The cuts over a large vocabulary match ranking it all: every draw lands in the nucleus a
    /// full sort gives, and the top token comes up as often as its share of the nucleus.
    #[test]
    fn cuts_over_a_large_vocabulary_match_a_full_ranking() {
        let mut rng = StdRng::seed_from_u64(3);
        let logits: Vec<f32> = (0..5000).map(|_| rng.random::<f32>() * 12.0).collect();
        for (top_p, min_p) in [(0.8, 0.0), (0.5, 0.1), (1.0, 0.2), (0.95, 0.0)] {
            let t = 0.7f32;
            let max = logits.iter().copied().fold(f32::MIN, f32::max);
            let mut order: Vec<usize> = (0..logits.len()).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            let w: Vec<f64> = order
                .iter()
                .map(|&i| (((logits[i] - max) / t) as f64).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut nucleus = Vec::new();
            let mut acc = 0.0;
            for (&i, &x) in order.iter().zip(&w) {
                if x < min_p as f64 || (top_p < 1.0 && acc >= top_p as f64) {
                    break;
                }
                acc += x / total;
                nucleus.push(i);
            }
            let mut s = Sampler::new(SamplingParams {
                temperature: t,
                top_p,
                min_p,
                seed: Some(11),
                ..Default::default()
            });
            let draws = 4000;
            let mut top = 0;
            for _ in 0..draws {
                let tok = s.sample(&mut logits.clone(), &[], &[]).token as usize;
                assert!(
                    nucleus.contains(&tok),
                    "top_p {top_p} min_p {min_p}: {tok} outside"
                );
                top += (tok == order[0]) as usize;
            }
            let kept: f64 = w[..nucleus.len()].iter().sum();
            let want = w[0] / kept;
            let got = top as f64 / draws as f64;
            assert!(
                (got - want).abs() < 4.0 * (want * (1.0 - want) / draws as f64).sqrt() + 1e-3,
                "top_p {top_p} min_p {min_p}: top token {got} vs {want}"
            );
        }
    }

    /// The device path draws from the same stream: with no cuts both walk the vocabulary in
    /// index order, so a seed gives the same tokens (up to a draw on a rounding boundary).
    /// Sequences that need the host get `None` and their stream is left alone.
    #[test]
    fn device_settings_draw_from_the_sequence_stream() {
        let mut rng = StdRng::seed_from_u64(9);
        let logits: Vec<f32> = (0..4000).map(|_| rng.random::<f32>() * 10.0).collect();
        let params = SamplingParams {
            temperature: 0.8,
            seed: Some(21),
            ..Default::default()
        };
        let (mut host, mut device) = (Sampler::new(params.clone()), Sampler::new(params));
        let differ = (0..300)
            .filter(|_| {
                let h = host.sample(&mut logits.clone(), &[], &[]).token;
                let d = candela_kernels::sample_row(&logits, &device.device_settings().unwrap());
                h != d
            })
            .count();
        assert!(differ <= 2, "{differ} of 300 draws differ");

        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let mut s = Sampler::new(greedy);
        assert_eq!(s.device_settings(), Some(RowSampling::GREEDY));
        for host_only in [
            SamplingParams {
                logprobs: Some(0),
                ..Default::default()
            },
            SamplingParams {
                repetition_penalty: 1.1,
                ..Default::default()
            },
            SamplingParams {
                presence_penalty: 0.5,
                ..Default::default()
            },
            SamplingParams {
                logit_bias: vec![(3, 1.0)],
                ..Default::default()
            },
        ] {
            let seeded = SamplingParams {
                seed: Some(4),
                ..host_only
            };
            let mut s = Sampler::new(seeded.clone());
            assert_eq!(s.device_settings(), None);
            let plain = SamplingParams {
                logprobs: None,
                repetition_penalty: 1.0,
                presence_penalty: 0.0,
                logit_bias: Vec::new(),
                ..seeded
            };
            let mut fresh = Sampler::new(plain);
            let (a, b) = (s.rng.random::<f32>(), fresh.rng.random::<f32>());
            assert_eq!(a, b, "the stream was not touched");
        }
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            frequency_penalty: 1.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[], &[1]).token, 4);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repetition_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&mut logits(), &[1], &[]).token, 4);
    }

    /// A bias moves the choice: -100 rules the greedy token out, +100 forces another in; the
    /// log-probabilities reported stay the model's own.
    #[test]
    fn logit_bias_moves_the_choice() {
        let greedy = |bias: Vec<(TokenId, f32)>| SamplingParams {
            temperature: 0.0,
            logprobs: Some(0),
            logit_bias: bias,
            ..Default::default()
        };
        let plain = Sampler::new(greedy(vec![])).sample(&mut logits(), &[], &[]);
        let mut s = Sampler::new(greedy(vec![(plain.token, -100.0)]));
        let avoided = s.sample(&mut logits(), &[], &[]);
        assert_ne!(avoided.token, plain.token);
        let mut s = Sampler::new(greedy(vec![(0, 100.0), (99_999, 5.0)]));
        let forced = s.sample(&mut logits(), &[], &[]);
        assert_eq!(forced.token, 0, "a token past the row's end is left alone");
        // Token 0's own log-probability is 1 - ln(Σ e^l) = -2.91; biased, it would be about 0.
        let lp = forced.logprob.unwrap();
        assert!((-2.95..-2.85).contains(&lp), "{lp}");
        let mut random = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(1),
            logit_bias: vec![(2, 100.0)],
            ..Default::default()
        });
        assert!((0..20).all(|_| random.sample(&mut logits(), &[], &[]).token == 2));
    }

    #[test]
    fn logprobs_are_normalised_and_ranked() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            logprobs: Some(2),
            ..Default::default()
        });
        let out = s.sample(&mut logits(), &[], &[]);
        let lp = out.logprob.unwrap();
        assert!(lp < 0.0);
        assert_eq!(out.top_logprobs[0].0, 1);
        assert_eq!(out.top_logprobs[1].0, 4);
        let total: f32 = log_softmax(&logits()).iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
