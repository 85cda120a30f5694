//! Sending one benchmark request and timing it: over HTTP to any OpenAI-compatible server
//! (streaming), or straight into an in-process engine.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

use super::dataset::BenchRequest;
use super::metrics::RequestResult;
use crate::serving::{ChatModel, GenParams};

pub enum Backend {
    Http {
        client: reqwest::Client,
        url: String,
        chat: bool,
        model: String,
    },
    InProcess(Arc<ChatModel>),
}

/// Streaming timings: first chunk, gaps between chunks, end.
struct Clock {
    start: Instant,
    last: Option<Instant>,
    result: RequestResult,
}

impl Clock {
    fn new(prompt_len: usize) -> Self {
        Self {
            start: Instant::now(),
            last: None,
            result: RequestResult {
                prompt_len,
                ..Default::default()
            },
        }
    }

    fn chunk(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.result.ttft = (now - self.start).as_secs_f64(),
            Some(prev) => self.result.itl.push((now - prev).as_secs_f64()),
        }
        self.last = Some(now);
    }

    fn finish(mut self, output_len: usize, error: Option<String>) -> RequestResult {
        self.result.latency = self.start.elapsed().as_secs_f64();
        self.result.output_len = output_len;
        self.result.success = error.is_none();
        self.result.error = error.unwrap_or_default();
        self.result
    }
}

impl Backend {
    pub async fn send(&self, req: &BenchRequest, ignore_eos: bool) -> RequestResult {
        match self {
            Backend::Http {
                client,
                url,
                chat,
                model,
            } => http(client, url, *chat, model, req, ignore_eos).await,
            Backend::InProcess(model) => in_process(model, req, ignore_eos).await,
        }
    }
}

async fn http(
    client: &reqwest::Client,
    url: &str,
    chat: bool,
    model: &str,
    req: &BenchRequest,
    ignore_eos: bool,
) -> RequestResult {
    let mut body = json!({
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": ignore_eos,
    });
    if chat {
        body["messages"] = json!([{"role": "user", "content": req.prompt}]);
    } else {
        body["prompt"] = json!(req.prompt);
    }
    let mut clock = Clock::new(req.prompt_len);
    let resp = match client.post(url).json(&body).send().await {
        Ok(r) => r,
        Err(e) => return clock.finish(0, Some(e.to_string())),
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        return clock.finish(0, Some(format!("HTTP {status}: {text}")));
    }
    let mut chunks = 0usize;
    let mut usage_tokens = None;
    let mut buf = String::new();
    let mut bytes = resp.bytes_stream();
    while let Some(next) = bytes.next().await {
        let data = match next {
            Ok(d) => d,
            Err(e) => return clock.finish(chunks, Some(e.to_string())),
        };
        buf.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = buf.find('\n') {
            let line: String = buf.drain(..=end).collect();
            let Some(payload) = line.trim().strip_prefix("data:").map(str::trim) else {
                continue;
            };
            if payload == "[DONE]" {
                continue;
            }
            let Ok(event) = serde_json::from_str::<Value>(payload) else {
                continue;
            };
            if let Some(err) = event.get("error") {
                return clock.finish(chunks, Some(err.to_string()));
            }
            if let Some(u) = event.get("usage").filter(|u| !u.is_null()) {
                usage_tokens = u["completion_tokens"].as_u64().map(|v| v as usize);
                if let Some(p) = u["prompt_tokens"].as_u64() {
                    clock.result.prompt_len = p as usize;
                }
            }
            let has_text = event["choices"].as_array().is_some_and(|cs| {
                cs.iter().any(|c| {
                    c["text"].as_str().is_some_and(|t| !t.is_empty())
                        || c["delta"]["content"]
                            .as_str()
                            .is_some_and(|t| !t.is_empty())
                })
            });
            if has_text {
                chunks += 1;
                clock.chunk();
            }
        }
    }
    clock.finish(usage_tokens.unwrap_or(chunks), None)
}

async fn in_process(model: &ChatModel, req: &BenchRequest, ignore_eos: bool) -> RequestResult {
    let mut clock = Clock::new(req.prompt_len);
    let started = model.completion_prompt(&req.prompt).and_then(|ids| {
        clock.result.prompt_len = ids.len();
        let mut params = GenParams {
            max_tokens: Some(req.output_len),
            ignore_eos,
            ..Default::default()
        };
        params.sampling.temperature = 0.0;
        model.start(ids, params, "prompt")
    });
    let mut gen = match started {
        Ok(g) => g,
        Err(e) => return clock.finish(0, Some(e.to_string())),
    };
    while let Some(chunk) = gen.next().await {
        match chunk {
            Ok(c) if !c.text.is_empty() => clock.chunk(),
            Ok(_) => {}
            Err(e) => return clock.finish(gen.completion_tokens, Some(e.to_string())),
        }
    }
    clock.finish(gen.completion_tokens, None)
}
