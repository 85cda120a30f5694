//! Benchmark prompts: random token sequences of exact lengths, ShareGPT-style conversations, or a
//! shared prefix followed by random suffixes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

/// One prompt to send, with its length in tokens and the output length to ask for.
#[derive(Clone, Debug)]
pub struct BenchRequest {
    pub prompt: String,
    pub prompt_len: usize,
    pub output_len: usize,
}

#[derive(Clone, Debug)]
pub enum Dataset {
    Random {
        input_len: usize,
        output_len: usize,
        range_ratio: f64,
    },
    ShareGpt {
        path: std::path::PathBuf,
        output_len: Option<usize>,
    },
    Prefix {
        prefix_len: usize,
        input_len: usize,
        output_len: usize,
    },
}

/// Token ids that decode to ordinary text (no special or added tokens).
fn plain_ids(tokenizer: &Tokenizer) -> Vec<u32> {
    let added: std::collections::HashSet<u32> = tokenizer
        .get_added_tokens_decoder()
        .keys()
        .copied()
        .collect();
    (0..tokenizer.get_vocab_size(false) as u32)
        .filter(|id| !added.contains(id))
        .collect()
}

/// Text of about `len` tokens: random ids decoded, re-encoded and cut to length, which settles
/// within a token or two of the target after a few rounds.
fn random_text(
    tokenizer: &Tokenizer,
    ids: &[u32],
    len: usize,
    rng: &mut StdRng,
) -> Result<(String, usize), String> {
    let mut tokens: Vec<u32> = (0..len)
        .map(|_| ids[rng.random_range(0..ids.len())])
        .collect();
    let mut text = String::new();
    for _ in 0..4 {
        text = tokenizer
            .decode(&tokens, false)
            .map_err(|e| e.to_string())?;
        let enc = tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| e.to_string())?;
        let got = enc.get_ids();
        if got.len() == len {
            return Ok((text, len));
        }
        tokens = got.iter().copied().take(len).collect();
        while tokens.len() < len {
            tokens.push(ids[rng.random_range(0..ids.len())]);
        }
    }
    let n = tokenizer
        .encode(text.as_str(), false)
        .map_err(|e| e.to_string())?
        .len();
    Ok((text, n))
}

pub fn build(
    dataset: &Dataset,
    tokenizer: &Tokenizer,
    num_prompts: usize,
    seed: u64,
) -> Result<Vec<BenchRequest>, String> {
    let mut rng = StdRng::seed_from_u64(seed);
    match dataset {
        Dataset::Random {
            input_len,
            output_len,
            range_ratio,
        } => {
            let ids = plain_ids(tokenizer);
            let range = |n: usize, rng: &mut StdRng| {
                let lo = ((n as f64) * (1.0 - range_ratio)).round().max(1.0) as usize;
                let hi = ((n as f64) * (1.0 + range_ratio)).round().max(lo as f64) as usize;
                rng.random_range(lo..=hi)
            };
            (0..num_prompts)
                .map(|_| {
                    let (prompt, prompt_len) =
                        random_text(tokenizer, &ids, range(*input_len, &mut rng), &mut rng)?;
                    Ok(BenchRequest {
                        prompt,
                        prompt_len,
                        output_len: range(*output_len, &mut rng),
                    })
                })
                .collect()
        }
        Dataset::Prefix {
            prefix_len,
            input_len,
            output_len,
        } => {
            let ids = plain_ids(tokenizer);
            let (prefix, _) = random_text(tokenizer, &ids, *prefix_len, &mut rng)?;
            (0..num_prompts)
                .map(|_| {
                    let (suffix, _) = random_text(tokenizer, &ids, *input_len, &mut rng)?;
                    let prompt = format!("{prefix}{suffix}");
                    let prompt_len = tokenizer
                        .encode(prompt.as_str(), false)
                        .map_err(|e| e.to_string())?
                        .len();
                    Ok(BenchRequest {
                        prompt,
                        prompt_len,
                        output_len: *output_len,
                    })
                })
                .collect()
        }
        Dataset::ShareGpt { path, output_len } => {
            sharegpt(path, tokenizer, num_prompts, *output_len, &mut rng)
        }
    }
}

/// ShareGPT format: a JSON list (or JSONL) of `{"conversations": [{"from": "human", "value": ...},
/// {"from": "gpt", "value": ...}, ...]}`. The first human turn is the prompt; the reply's length is
/// the output length unless one is given. Like vLLM, too short or too long pairs are skipped.
fn sharegpt(
    path: &std::path::Path,
    tokenizer: &Tokenizer,
    num_prompts: usize,
    output_len: Option<usize>,
    rng: &mut StdRng,
) -> Result<Vec<BenchRequest>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let entries: Vec<serde_json::Value> = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Array(v)) => v,
        _ => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("{}: {e}", path.display())))
            .collect::<Result<_, _>>()?,
    };
    let mut pairs: Vec<(String, String)> = entries
        .iter()
        .filter_map(|e| {
            let turns = e
                .get("conversations")
                .or_else(|| e.get("conversation"))?
                .as_array()?;
            let text = |t: &serde_json::Value| {
                t.get("value")
                    .or_else(|| t.get("content"))?
                    .as_str()
                    .map(str::to_owned)
            };
            Some((text(turns.first()?)?, text(turns.get(1)?)?))
        })
        .collect();
    // Shuffle deterministically (Fisher-Yates) so that --seed picks the sample.
    for i in (1..pairs.len()).rev() {
        pairs.swap(i, rng.random_range(0..=i));
    }
    let mut out = Vec::new();
    for (prompt, reply) in pairs {
        if out.len() == num_prompts {
            break;
        }
        let prompt_len = tokenizer
            .encode(prompt.as_str(), false)
            .map_err(|e| e.to_string())?
            .len();
        let reply_len = tokenizer
            .encode(reply.as_str(), false)
            .map_err(|e| e.to_string())?
            .len();
        let out_len = output_len.unwrap_or(reply_len);
        if prompt_len < 4 || out_len < 4 || prompt_len > 1024 || prompt_len + out_len > 2048 {
            continue;
        }
        out.push(BenchRequest {
            prompt,
            prompt_len,
            output_len: out_len,
        });
    }
    if out.is_empty() {
        return Err(format!("{}: no usable conversations", path.display()));
    }
    Ok(out)
}
