//! Log-probabilities as the APIs list them: chat's and the Responses API's entries, and legacy
//! completions' parallel lists, with a prompt's own ahead of the answer's under `echo`.

use serde_json::{json, Value};

use crate::serving::TokenLogprob;

/// Log-probabilities as chat and the Responses API list them: token, logprob, bytes, and the
/// alternatives.
pub fn token_logprobs(lps: &[TokenLogprob]) -> Vec<Value> {
    let entry = |token: &str, logprob: f32| json!({"token": token, "logprob": logprob, "bytes": token.as_bytes()});
    lps.iter()
        .map(|lp| {
            let mut e = entry(&lp.token, lp.logprob);
            e["top_logprobs"] = lp.top.iter().map(|(t, l)| entry(t, *l)).collect();
            e
        })
        .collect()
}

/// Legacy completions' `logprobs`: parallel lists of tokens, their log-probabilities (`null` for
/// a prompt's first token), their alternatives and their offsets in the text.
pub fn completion_logprobs<'a>(
    entries: impl Iterator<Item = (&'a str, Option<f32>, Option<&'a [(String, f32)]>)>,
    text_offset: usize,
) -> Value {
    let (mut tokens, mut logprobs, mut top, mut offsets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut offset = text_offset;
    for (token, logprob, alternatives) in entries {
        tokens.push(token);
        logprobs.push(logprob);
        top.push(
            alternatives.map(|alts| {
                Value::Object(alts.iter().map(|(t, l)| (t.clone(), json!(l))).collect())
            }),
        );
        offsets.push(offset);
        offset += token.len();
    }
    json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets})
}

/// With `echo` and `logprobs`: the prompt's tokens (`first` is the text of its first), then the
/// answer's.
pub fn echo_logprobs(
    first: &str,
    prompt: &[Option<TokenLogprob>],
    answer: &[TokenLogprob],
) -> Value {
    let prompt = prompt.iter().enumerate().map(|(i, lp)| match lp {
        Some(lp) => (lp.token.as_str(), Some(lp.logprob), Some(&lp.top[..])),
        None if i == 0 => (first, None, None),
        None => ("", None, None),
    });
    let answer = answer
        .iter()
        .map(|lp| (lp.token.as_str(), Some(lp.logprob), Some(&lp.top[..])));
    completion_logprobs(prompt.chain(answer), 0)
}

/// Where the answer's text offsets start after an echoed prompt: past its tokens' text.
pub fn echo_len(first: &str, prompt: &[Option<TokenLogprob>]) -> usize {
    first.len()
        + prompt
            .iter()
            .skip(1)
            .flatten()
            .map(|lp| lp.token.len())
            .sum::<usize>()
}
