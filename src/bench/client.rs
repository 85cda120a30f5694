//! Sending one benchmark request and timing it: over HTTP to any OpenAI-compatible server
//! (streaming), or straight into an in-process engine.

use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

use super::dataset::BenchRequest;
use super::metrics::RequestResult;
use crate::sampling::SamplingParams;
use crate::serving::{ChatModel, GenParams};

/// What every request of a run carries besides its prompt and lengths.
#[derive(Clone, Debug, Default)]
pub struct RequestOptions {
    pub ignore_eos: bool,
    /// Sampling fields (`temperature`, `top_p`, ...) and `--extra-body`, merged into each
    /// request's JSON body over the defaults (greedy).
    pub body: serde_json::Map<String, Value>,
    /// Each measured request is sent with `x-request-id: PREFIX<index>`.
    pub request_id_prefix: Option<String>,
    /// Log-probabilities asked for per generated token (`--logprobs`).
    pub logprobs: Option<u32>,
}

impl RequestOptions {
    /// The sampling an in-process request gets: greedy unless the body's fields say otherwise.
    fn sampling(&self) -> SamplingParams {
        let f = |k: &str| self.body.get(k).and_then(Value::as_f64).map(|v| v as f32);
        let d = SamplingParams::default();
        SamplingParams {
            temperature: f("temperature").unwrap_or(0.0),
            top_p: f("top_p").unwrap_or(d.top_p),
            top_k: self
                .body
                .get("top_k")
                .and_then(Value::as_i64)
                .map_or(d.top_k, |k| k.max(0) as usize),
            min_p: f("min_p").unwrap_or(d.min_p),
            presence_penalty: f("presence_penalty").unwrap_or(d.presence_penalty),
            frequency_penalty: f("frequency_penalty").unwrap_or(d.frequency_penalty),
            repetition_penalty: f("repetition_penalty").unwrap_or(d.repetition_penalty),
            logprobs: self.logprobs.map(|n| n as usize),
            ..d
        }
    }
}

pub enum Backend {
    Http {
        client: reqwest::Client,
        /// The server's root, where a candela server answers `/metrics`.
        base: String,
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

    fn chunk(&mut self, text: &str) {
        self.result.text.push_str(text);
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
    /// Sends one request; `id` is the `x-request-id` to send with it, if any.
    pub async fn send(
        &self,
        req: &BenchRequest,
        opts: &RequestOptions,
        id: Option<String>,
    ) -> RequestResult {
        match self {
            Backend::Http {
                client,
                url,
                chat,
                model,
                ..
            } => http(client, url, *chat, model, req, opts, id).await,
            Backend::InProcess(model) => in_process(model, req, opts).await,
        }
    }

    /// The engine's step counters now: read in process, or scraped from a candela server's
    /// `/metrics`. None where there are none to read (another server, or `/metrics` needs an
    /// admin token this run does not have).
    pub async fn engine_counters(&self) -> Option<EngineCounters> {
        match self {
            Backend::InProcess(model) => {
                let s = &model.engine.stats;
                let get = crate::engine::EngineStats::get;
                Some(EngineCounters {
                    steps: get(&s.steps) as f64,
                    step_seconds: get(&s.step_micros) as f64 * 1e-6,
                    launch_seconds: get(&s.step_launch_micros) as f64 * 1e-6,
                    computed_tokens: get(&s.computed_tokens) as f64,
                })
            }
            Backend::Http {
                client,
                base,
                model,
                ..
            } => {
                let response = client.get(format!("{base}/metrics")).send().await.ok()?;
                if !response.status().is_success() {
                    return None;
                }
                EngineCounters::parse(&response.text().await.ok()?, model)
            }
        }
    }
}

/// Cumulative engine step counters of one model (see `EngineStats`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineCounters {
    pub steps: f64,
    pub step_seconds: f64,
    pub launch_seconds: f64,
    pub computed_tokens: f64,
}

impl EngineCounters {
    /// Reads `model`'s counters from a Prometheus text exposition.
    fn parse(exposition: &str, model: &str) -> Option<Self> {
        let label = format!("{{model=\"{model}\"}}");
        let value = |name: &str| {
            let series = format!("{name}{label} ");
            exposition
                .lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Some(Self {
            steps: value("candela_engine_steps_total")?,
            step_seconds: value("candela_engine_step_seconds_total")?,
            launch_seconds: value("candela_engine_step_launch_seconds_total")?,
            computed_tokens: value("candela_engine_computed_tokens_total")?,
        })
    }

    /// What the engine did between `before` and `self`, as the saved result's keys; empty when
    /// it ran no step.
    pub fn since(&self, before: &Self) -> serde_json::Map<String, Value> {
        let steps = self.steps - before.steps;
        let mut out = serde_json::Map::new();
        if steps <= 0.0 {
            return out;
        }
        let step = self.step_seconds - before.step_seconds;
        let launch = self.launch_seconds - before.launch_seconds;
        let tokens = self.computed_tokens - before.computed_tokens;
        for (k, v) in [
            ("engine_steps", steps),
            ("mean_step_ms", step / steps * 1e3),
            ("mean_step_launch_ms", launch / steps * 1e3),
            (
                "step_launch_fraction",
                if step > 0.0 { launch / step } else { 0.0 },
            ),
            ("mean_tokens_per_step", tokens / steps),
        ] {
            out.insert(k.into(), json!(v));
        }
        out
    }
}

async fn http(
    client: &reqwest::Client,
    url: &str,
    chat: bool,
    model: &str,
    req: &BenchRequest,
    opts: &RequestOptions,
    id: Option<String>,
) -> RequestResult {
    let mut body = json!({
        "model": model,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": opts.ignore_eos,
    });
    for (k, v) in &opts.body {
        body[k] = v.clone();
    }
    if chat {
        body["messages"] = json!([{"role": "user", "content": req.prompt}]);
    } else {
        body["prompt"] = json!(req.prompt);
    }
    match (opts.logprobs, chat) {
        (Some(n), true) => {
            body["logprobs"] = json!(true);
            body["top_logprobs"] = json!(n);
        }
        (Some(n), false) => body["logprobs"] = json!(n),
        (None, _) => {}
    }
    let mut clock = Clock::new(req.prompt_len);
    let mut post = client.post(url).json(&body);
    if let Some(id) = id {
        post = post.header("x-request-id", id);
    }
    let resp = match post.send().await {
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
            let text: String = event["choices"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["text"].as_str().or(c["delta"]["content"].as_str()))
                .collect();
            if !text.is_empty() {
                chunks += 1;
                clock.chunk(&text);
            }
        }
    }
    clock.finish(usage_tokens.unwrap_or(chunks), None)
}

async fn in_process(model: &ChatModel, req: &BenchRequest, opts: &RequestOptions) -> RequestResult {
    let mut clock = Clock::new(req.prompt_len);
    let started = model.completion_prompt(&req.prompt).and_then(|ids| {
        clock.result.prompt_len = ids.len();
        let params = GenParams {
            max_tokens: Some(req.output_len),
            ignore_eos: opts.ignore_eos,
            sampling: opts.sampling(),
            ..Default::default()
        };
        model.start(ids, params, "prompt")
    });
    let mut gen = match started {
        Ok(g) => g,
        Err(e) => return clock.finish(0, Some(e.to_string())),
    };
    while let Some(chunk) = gen.next().await {
        match chunk {
            Ok(c) if !c.text.is_empty() => clock.chunk(&c.text),
            Ok(_) => {}
            Err(e) => return clock.finish(gen.completion_tokens, Some(e.to_string())),
        }
    }
    clock.finish(gen.completion_tokens, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_counters_are_read_per_model_and_differenced() {
        let exposition = "\
# TYPE candela_engine_steps_total counter
candela_engine_steps_total{model=\"other\"} 7
candela_engine_steps_total{model=\"llama\"} 110
candela_engine_step_seconds_total{model=\"llama\"} 3.5
candela_engine_step_launch_seconds_total{model=\"llama\"} 0.5
candela_engine_computed_tokens_total{model=\"llama\"} 4200
";
        let after = EngineCounters::parse(exposition, "llama").unwrap();
        assert_eq!(after.steps, 110.0);
        assert!(EngineCounters::parse(exposition, "other").is_none());
        assert!(EngineCounters::parse("", "llama").is_none());

        let before = EngineCounters {
            steps: 10.0,
            step_seconds: 0.5,
            launch_seconds: 0.1,
            computed_tokens: 200.0,
        };
        let d = after.since(&before);
        let get = |k: &str| d[k].as_f64().unwrap();
        assert_eq!(get("engine_steps"), 100.0);
        assert!((get("mean_step_ms") - 30.0).abs() < 1e-9);
        assert!((get("mean_step_launch_ms") - 4.0).abs() < 1e-9);
        assert!((get("step_launch_fraction") - 0.4 / 3.0).abs() < 1e-9);
        assert_eq!(get("mean_tokens_per_step"), 40.0);
        assert!(after.since(&after).is_empty());
    }
}
