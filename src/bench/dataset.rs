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
    /// Random tokens; with `prefix_len`, after a random prefix that every prompt shares (vLLM's
    /// `--random-prefix-len`).
    Random {
        prefix_len: usize,
        input_len: usize,
        output_len: usize,
        range_ratio: f64,
    },
    /// Conversations from a file, in seeded random order unless `shuffle` is off; with
    /// `oversample`, repeated at random up to the number of prompts when too few are usable.
    ShareGpt {
        path: std::path::PathBuf,
        output_len: Option<usize>,
        shuffle: bool,
        oversample: bool,
    },
    /// `num_prefixes` random prefixes, each shared by an equal part of the prompts (in random
    /// order), followed by random suffixes of `input_len`.
    Prefix {
        prefix_len: usize,
        num_prefixes: usize,
        input_len: usize,
        output_len: usize,
        shuffle: bool,
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
            prefix_len,
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
            let prefix = shared_prefix(tokenizer, &ids, *prefix_len, &mut rng)?;
            (0..num_prompts)
                .map(|_| {
                    let (text, len) =
                        random_text(tokenizer, &ids, range(*input_len, &mut rng), &mut rng)?;
                    let output_len = range(*output_len, &mut rng);
                    match &prefix {
                        None => Ok(BenchRequest {
                            prompt: text,
                            prompt_len: len,
                            output_len,
                        }),
                        Some(prefix) => joined(tokenizer, prefix, &text, output_len),
                    }
                })
                .collect()
        }
        Dataset::Prefix {
            prefix_len,
            num_prefixes,
            input_len,
            output_len,
            shuffle: shuffled,
        } => {
            let ids = plain_ids(tokenizer);
            let prefixes = (0..(*num_prefixes).max(1))
                .map(|_| Ok(random_text(tokenizer, &ids, *prefix_len, &mut rng)?.0))
                .collect::<Result<Vec<_>, String>>()?;
            // Each prefix takes an equal share of the prompts, in turn unless shuffled.
            let mut which: Vec<usize> = (0..num_prompts).map(|i| i % prefixes.len()).collect();
            if *shuffled {
                shuffle(&mut which, &mut rng);
            }
            which
                .into_iter()
                .map(|p| {
                    let (suffix, _) = random_text(tokenizer, &ids, *input_len, &mut rng)?;
                    joined(tokenizer, &prefixes[p], &suffix, *output_len)
                })
                .collect()
        }
        Dataset::ShareGpt {
            path,
            output_len,
            shuffle: shuffled,
            oversample,
        } => {
            let mut out = sharegpt(
                path,
                tokenizer,
                num_prompts,
                *output_len,
                *shuffled,
                &mut rng,
            )?;
            // As vLLM does: repeat prompts drawn at random until there are enough.
            let usable = out.len();
            while *oversample && out.len() < num_prompts {
                out.push(out[rng.random_range(0..usable)].clone());
            }
            Ok(out)
        }
    }
}

/// A random prefix of `len` tokens for every prompt to share; none for 0.
fn shared_prefix(
    tokenizer: &Tokenizer,
    ids: &[u32],
    len: usize,
    rng: &mut StdRng,
) -> Result<Option<String>, String> {
    (len > 0)
        .then(|| Ok(random_text(tokenizer, ids, len, rng)?.0))
        .transpose()
}

/// A prompt made of a prefix and a suffix, with its length as the tokenizer counts the whole.
/// They are joined as tokens, then decoded: as text, the prefix's last word and the suffix's
/// first could run together.
fn joined(
    tokenizer: &Tokenizer,
    prefix: &str,
    suffix: &str,
    output_len: usize,
) -> Result<BenchRequest, String> {
    let encode = |text: &str| {
        tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    };
    let mut ids = encode(prefix)?;
    ids.extend(encode(suffix)?);
    let prompt = tokenizer.decode(&ids, false).map_err(|e| e.to_string())?;
    let prompt_len = encode(&prompt)?.len();
    Ok(BenchRequest {
        prompt,
        prompt_len,
        output_len,
    })
}

/// Fisher-Yates, so that the seed decides the order.
fn shuffle<T>(items: &mut [T], rng: &mut StdRng) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.random_range(0..=i));
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
    shuffled: bool,
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
    // --seed picks the sample.
    if shuffled {
        shuffle(&mut pairs, rng);
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
        // As vLLM filters: a fixed output length is not checked against the minimum.
        let too_short = prompt_len < 4 || (output_len.is_none() && out_len < 4);
        if too_short || prompt_len > 1024 || prompt_len + out_len > 2048 {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        candela_models::dummy::synthetic_tokenizer(500).unwrap()
    }

    /// The first `n` token ids of a prompt.
    fn head(tokenizer: &Tokenizer, prompt: &str, n: usize) -> Vec<u32> {
        tokenizer.encode(prompt, false).unwrap().get_ids()[..n].to_vec()
    }

    #[test]
    fn random_prompts_can_share_a_prefix() {
        let t = tokenizer();
        let dataset = Dataset::Random {
            prefix_len: 12,
            input_len: 20,
            output_len: 7,
            range_ratio: 0.0,
        };
        let requests = build(&dataset, &t, 5, 3).unwrap();
        assert_eq!(requests.len(), 5);
        let first = head(&t, &requests[0].prompt, 12);
        for r in &requests {
            assert_eq!(r.prompt_len, 32);
            assert_eq!(t.encode(r.prompt.as_str(), false).unwrap().len(), 32);
            assert_eq!(r.output_len, 7);
            assert_eq!(head(&t, &r.prompt, 12), first);
        }
        assert_ne!(requests[0].prompt, requests[1].prompt, "suffixes differ");
    }

    #[test]
    fn sharegpt_files_are_shuffled_and_oversampled_unless_told_not_to() {
        let t = tokenizer();
        let path =
            std::env::temp_dir().join(format!("candela-sharegpt-{}.jsonl", std::process::id()));
        let turn = |from: &str, words: &str| serde_json::json!({"from": from, "value": words});
        let lines: Vec<String> = (0..3)
            .map(|i| {
                let prompt = format!("w{i} w1 w2 w3 w4");
                serde_json::json!({"conversations": [turn("human", &prompt), turn("gpt", "w9 w8 w7 w6 w5 w4")]})
                    .to_string()
            })
            .chain(["{\"conversations\": [{\"from\": \"human\", \"value\": \"w1\"}]}".into()])
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
        let dataset = |shuffle, oversample| Dataset::ShareGpt {
            path: path.clone(),
            output_len: None,
            shuffle,
            oversample,
        };
        let ordered = build(&dataset(false, false), &t, 7, 0).unwrap();
        let firsts: Vec<&str> = ordered.iter().map(|r| &r.prompt[..2]).collect();
        assert_eq!(
            firsts,
            ["w0", "w1", "w2"],
            "file order, the unusable line skipped"
        );
        assert!(ordered
            .iter()
            .all(|r| r.prompt_len == 5 && r.output_len == 6));
        let short = Dataset::ShareGpt {
            path: path.clone(),
            output_len: Some(2),
            shuffle: true,
            oversample: false,
        };
        let short = build(&short, &t, 7, 0).unwrap();
        assert_eq!(
            short.len(),
            3,
            "a fixed output length may be under 4, as in vLLM"
        );
        let filled = build(&dataset(true, true), &t, 7, 0).unwrap();
        assert_eq!(filled.len(), 7);
        assert!(filled
            .iter()
            .all(|r| ordered.iter().any(|o| o.prompt == r.prompt)));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn prefix_repetition_shares_each_prefix_out_evenly() {
        let t = tokenizer();
        let dataset = Dataset::Prefix {
            prefix_len: 16,
            num_prefixes: 3,
            input_len: 8,
            output_len: 5,
            shuffle: true,
        };
        let requests = build(&dataset, &t, 10, 1).unwrap();
        let mut counts = std::collections::HashMap::<Vec<u32>, usize>::new();
        for r in &requests {
            assert_eq!(r.prompt_len, 24);
            assert_eq!(r.output_len, 5);
            *counts.entry(head(&t, &r.prompt, 16)).or_default() += 1;
        }
        let mut shares: Vec<usize> = counts.into_values().collect();
        shares.sort();
        assert_eq!(shares, [3, 3, 4]);
        // The same seed gives the same prompts.
        let again = build(&dataset, &t, 10, 1).unwrap();
        assert!(requests
            .iter()
            .zip(&again)
            .all(|(a, b)| a.prompt == b.prompt));
    }
}
