//! The start-up speed calibration behind `@fastest`: a short, fixed workload per model, timed on
//! this machine. Chat models report decode tokens/s of one stream; embedding models report input
//! tokens/s of a small batch. Each is run twice and the second (warm) run counts.

use std::time::Instant;

use super::{ChatModel, EmbeddingModel, GenParams};
use crate::sampling::SamplingParams;

const TEXT: &str = "Calibration: a short passage about rivers, mountains and the weather, long enough to be a realistic prompt for a model.";
const DECODE_TOKENS: usize = 32;

/// Decode tokens per second of one greedy stream.
pub fn chat(model: &ChatModel) -> Option<f64> {
    let prompt = model.completion_prompt(TEXT).ok()?;
    let run = || -> Option<f64> {
        let params = GenParams {
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens: Some(DECODE_TOKENS + 1),
            ignore_eos: true,
            ..GenParams::default()
        };
        let mut gen = model.start(prompt.clone(), params, "prompt").ok()?;
        let mut times = Vec::with_capacity(DECODE_TOKENS + 1);
        futures::executor::block_on(async {
            while let Some(chunk) = gen.next().await {
                chunk.ok()?;
                times.push(Instant::now());
            }
            Some(())
        })?;
        // From the first token on: decode only, no prefill.
        let span = times.last()?.duration_since(*times.first()?).as_secs_f64();
        (span > 0.0).then(|| (times.len() - 1) as f64 / span)
    };
    run()?;
    run()
}

/// Input tokens per second of a batch of eight short texts.
pub fn embedding(model: &EmbeddingModel) -> Option<f64> {
    let inputs = model.tokenize(&vec![TEXT.to_string(); 8]).ok()?;
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let run = || -> Option<f64> {
        let started = Instant::now();
        futures::executor::block_on(model.embed(inputs.clone())).ok()?;
        Some(tokens as f64 / started.elapsed().as_secs_f64())
    };
    run()?;
    run()
}
