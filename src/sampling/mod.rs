//! Turning a row of logits into the next token: penalties, temperature, top-k, top-p, min-p,
//! seeded randomness, and the log-probabilities OpenAI's `logprobs` reports.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::ids::TokenId;

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

/// Per-sequence sampling state: the random stream and output-token counts for penalties.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
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
            argmax(logits)
        } else {
            self.sample_random(logits)
        };
        Sampled {
            token: token as TokenId,
            logprob: logprob_of.map(|lp| lp[token]),
            top_logprobs,
        }
    }

    fn apply_penalties(&self, logits: &mut [f32], prompt: &[TokenId], output: &[TokenId]) {
        let p = &self.params;
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

    fn sample_random(&mut self, logits: &[f32]) -> usize {
        let p = &self.params;
        // Candidates sorted by logit, cut by top-k first so that the sort stays small.
        let mut idx: Vec<usize> = if p.top_k > 0 && p.top_k < logits.len() {
            top_k_indices(logits, p.top_k)
        } else {
            let mut all: Vec<usize> = (0..logits.len()).collect();
            all.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]));
            all
        };
        let max = logits[idx[0]];
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i] - max) / p.temperature).exp())
            .collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if p.min_p > 0.0 {
            let cut = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&x| x >= cut).count().max(1);
            idx.truncate(keep);
            probs.truncate(keep);
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&x| {
                    acc += x;
                    acc >= p.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            idx.truncate(keep);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, &pr) in idx.iter().zip(&probs) {
            if r < pr {
                return *i;
            }
            r -= pr;
        }
        *idx.last().expect("at least one candidate")
    }
}

fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
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
