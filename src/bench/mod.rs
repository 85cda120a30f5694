//! `candela bench`: a serving benchmark for any OpenAI-compatible server (or an in-process
//! engine), with `vllm bench serve`'s flags, metrics and result keys, so results can be diffed.

mod client;
mod dataset;
mod metrics;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};
use serde_json::{json, Value};
use tokenizers::Tokenizer;

pub use client::{Backend, RequestOptions};
pub use dataset::{BenchRequest, Dataset};
pub use metrics::{percentile, summarize, Reporting, RequestResult};

use crate::catalog::Catalog;

/// `--backend` values, as `vllm bench serve` names them. All but `openai-chat` send text
/// completions.
const BACKENDS: [&str; 6] = [
    "openai",
    "openai-chat",
    "vllm",
    "sglang",
    "lmdeploy",
    "llama.cpp",
];

/// Keys of the saved JSON that list a value per request; kept only with `--save-detailed`.
const DETAILED_KEYS: [&str; 8] = [
    "start_times",
    "latencies",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "generated_texts",
    "errors",
];

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Server to benchmark (any OpenAI-compatible API: candela, vLLM, llama.cpp's server).
    /// Default: http://HOST:PORT.
    #[arg(long)]
    pub base_url: Option<String>,
    /// Server host, when --base-url is not given.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Server port, when --base-url is not given (candela serves on 8080, vLLM on 8000).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Request format, as vLLM names it: `openai-chat` sends chat completions, the others
    /// (openai, vllm, sglang, lmdeploy, llama.cpp) text completions.
    #[arg(long, default_value = "openai", value_parser = BACKENDS)]
    pub backend: String,
    /// API path. Default: /v1/chat/completions with --backend openai-chat, else /v1/completions.
    /// A path naming chat completions sends one user message per prompt.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Headers to send with every request, e.g. `--header x-tenant=a x-trace=1`.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub header: Vec<String>,
    /// API key sent as `Authorization: Bearer KEY` (a candela access token, so that the load
    /// counts against that project's rate limits rather than the anonymous ones).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Model id to request. Default: the first model the server lists. A path (a GGUF file, a
    /// model directory or a config.json, as `candela serve --model` takes) names the tokenizer
    /// instead, and the first model the server lists is requested. With --offline: a catalog id or
    /// a path to load in-process.
    #[arg(long)]
    pub model: Option<String>,
    /// The model name to put in requests, where it differs from --model (which then only names
    /// the catalog model whose tokenizer makes the prompts).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Wait up to this many seconds for the server to answer `GET /v1/models` before starting
    /// (0: do not wait).
    #[arg(long, default_value_t = 0, value_name = "SECONDS")]
    pub ready_check_timeout_sec: u64,
    /// Workload: random (random tokens of the given lengths, optionally after a shared
    /// --random-prefix-len prefix), sharegpt (--dataset-path), prefix (one shared --prefix-len
    /// prefix followed by random suffixes of --random-input-len), or prefix_repetition (vLLM's:
    /// several shared prefixes, the --prefix-repetition-* flags).
    #[arg(long, default_value = "random",
          value_parser = ["random", "sharegpt", "prefix", "prefix_repetition"])]
    pub dataset_name: String,
    /// ShareGPT-style JSON or JSONL file.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    /// Input length for any workload (sets --random-input-len and --prefix-repetition-suffix-len).
    #[arg(long)]
    pub input_len: Option<usize>,
    /// Output length for any workload (sets --random-output-len, --sharegpt-output-len and
    /// --prefix-repetition-output-len).
    #[arg(long)]
    pub output_len: Option<usize>,
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Random tokens that every random prompt starts with (on top of --random-input-len).
    #[arg(long, default_value_t = 0)]
    pub random_prefix_len: usize,
    /// Shared prefix length for --dataset-name prefix.
    #[arg(long, default_value_t = 256)]
    pub prefix_len: usize,
    /// --dataset-name prefix_repetition: tokens of each shared prefix.
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_prefix_len: usize,
    /// --dataset-name prefix_repetition: random tokens after the prefix.
    #[arg(long, default_value_t = 256)]
    pub prefix_repetition_suffix_len: usize,
    /// --dataset-name prefix_repetition: how many different prefixes the prompts share out.
    #[arg(long, default_value_t = 10)]
    pub prefix_repetition_num_prefixes: usize,
    /// --dataset-name prefix_repetition: tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub prefix_repetition_output_len: usize,
    /// Output length for ShareGPT prompts (default: the length of the recorded reply).
    #[arg(long)]
    pub sharegpt_output_len: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    pub num_prompts: usize,
    /// Requests per second (Poisson arrivals, or gamma with --burstiness); inf sends all at once.
    #[arg(long, default_value = "inf")]
    pub request_rate: f64,
    /// Gamma shape of the inter-arrival times: 1 is Poisson, lower is burstier.
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Most requests in flight at once.
    #[arg(long)]
    pub max_concurrency: Option<usize>,
    /// Generate exactly the requested output length (ignore end-of-sequence).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature (default 0: greedy, as vLLM's benchmark sends).
    #[arg(long, help_heading = "Sampling")]
    pub temperature: Option<f64>,
    #[arg(long, help_heading = "Sampling")]
    pub top_p: Option<f64>,
    #[arg(long, help_heading = "Sampling")]
    pub top_k: Option<i64>,
    #[arg(long, help_heading = "Sampling")]
    pub min_p: Option<f64>,
    #[arg(long, help_heading = "Sampling")]
    pub frequency_penalty: Option<f64>,
    #[arg(long, help_heading = "Sampling")]
    pub presence_penalty: Option<f64>,
    #[arg(long, help_heading = "Sampling")]
    pub repetition_penalty: Option<f64>,
    /// A JSON object merged into every request's body, e.g. `--extra-body '{"top_k": 20}'`.
    #[arg(long, value_name = "JSON", help_heading = "Sampling")]
    pub extra_body: Option<String>,
    /// Send each request with `x-request-id: PREFIX<index>`.
    #[arg(long)]
    pub request_id_prefix: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tokenizer.json, a GGUF file, or a model config.json served with `--load-format dummy`
    /// (its synthetic tokenizer), used to make prompts of exact token lengths. Default: the
    /// in-process model's own with --offline, else that of --model (a path, or a catalog id).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Accepted for vLLM's command lines; candela runs no model code, so it changes nothing.
    #[arg(long, hide = true)]
    pub trust_remote_code: bool,
    /// Requests sent (one at a time) before measuring.
    #[arg(long, default_value_t = 1)]
    pub num_warmups: usize,
    /// No progress bar.
    #[arg(long)]
    pub disable_tqdm: bool,
    /// Comma-separated metrics to report: ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,
    /// Comma-separated percentiles to report.
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,
    /// Service-level objectives for goodput, e.g. `--goodput ttft:500 tpot:50` (milliseconds).
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Write the results as JSON (vLLM's keys): to FILE when given (as --result-filename),
    /// else to --result-dir/--result-filename or LABEL-RATEqps[-concurrencyN]-MODEL-DATE.json.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "")]
    pub save_result: Option<String>,
    /// Also save the per-request lists (start_times, latencies, input_lens, output_lens, ttfts,
    /// itls, generated_texts, errors).
    #[arg(long)]
    pub save_detailed: bool,
    /// Append the result to the file as one JSON line, rather than replace it.
    #[arg(long)]
    pub append_result: bool,
    /// Extra `KEY=VALUE` pairs to record in the saved JSON, e.g. `--metadata gpu=h100 tp=1`.
    #[arg(long, num_args = 1.., value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// The result file's name prefix (default: the backend).
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long)]
    pub result_dir: Option<PathBuf>,
    #[arg(long)]
    pub result_filename: Option<String>,
    /// Drive an engine in this process instead of a server (raw engine throughput, no HTTP).
    #[arg(long)]
    pub offline: bool,
    /// KV-cache memory for --offline, in GiB.
    #[arg(long, value_name = "GIB")]
    pub kv_cache_memory: Option<f64>,
    /// Sequence limit for --offline.
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    /// For --offline: `dummy` loads --model (a config.json) with random weights.
    #[arg(long, default_value = "auto", value_parser = ["auto", "dummy"])]
    pub load_format: String,
}

impl BenchArgs {
    /// Values no run can use, named by their flag.
    fn check(&self) -> Result<(), BenchError> {
        // Written so that NaN fails too.
        let positive = |x: f64| x > 0.0;
        if !positive(self.request_rate) || !positive(self.burstiness) {
            return Err(err("--request-rate and --burstiness must be positive"));
        }
        if !(self.random_range_ratio >= 0.0 && self.random_range_ratio < 1.0) {
            return Err(err("--random-range-ratio must be in [0, 1)"));
        }
        if self.num_prompts == 0 {
            return Err(err("--num-prompts must be at least 1"));
        }
        if self.max_concurrency == Some(0) {
            return Err(err("--max-concurrency must be at least 1"));
        }
        let lengths = [
            ("--input-len", self.input_len.unwrap_or(1)),
            ("--output-len", self.output_len.unwrap_or(1)),
            ("--random-input-len", self.random_input_len),
            ("--random-output-len", self.random_output_len),
            (
                "--prefix-repetition-output-len",
                self.prefix_repetition_output_len,
            ),
            (
                "--prefix-repetition-num-prefixes",
                self.prefix_repetition_num_prefixes,
            ),
        ];
        match lengths.iter().find(|(_, n)| *n == 0) {
            Some((flag, _)) => Err(err(format!("{flag} must be at least 1"))),
            None => Ok(()),
        }
    }

    /// The server's root URL.
    fn base(&self) -> String {
        let url = match &self.base_url {
            Some(u) => u.clone(),
            None => format!("http://{}:{}", self.host, self.port),
        };
        url.trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string()
    }

    fn endpoint(&self) -> Result<String, BenchError> {
        let chat_backend = self.backend == "openai-chat";
        match &self.endpoint {
            None if chat_backend => Ok("/v1/chat/completions".into()),
            None => Ok("/v1/completions".into()),
            Some(e) if chat_backend && !e.trim_end_matches('/').ends_with("chat/completions") => {
                Err(err(format!(
                    "--backend openai-chat sends chat completions, but --endpoint {e} does not \
                     end with chat/completions"
                )))
            }
            Some(e) => Ok(e.clone()),
        }
    }

    /// The request body fields the sampling flags and --extra-body set.
    fn request_body(&self) -> Result<serde_json::Map<String, Value>, BenchError> {
        let mut body = serde_json::Map::new();
        for (k, v) in [
            ("temperature", self.temperature),
            ("top_p", self.top_p),
            ("min_p", self.min_p),
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
            ("repetition_penalty", self.repetition_penalty),
        ] {
            if let Some(v) = v {
                body.insert(k.into(), json!(v));
            }
        }
        if let Some(k) = self.top_k {
            body.insert("top_k".into(), json!(k));
        }
        if let Some(extra) = &self.extra_body {
            match serde_json::from_str::<Value>(extra) {
                Ok(Value::Object(m)) => body.extend(m),
                _ => return Err(err("--extra-body: expected a JSON object")),
            }
        }
        Ok(body)
    }

    fn headers(&self) -> Result<reqwest::header::HeaderMap, BenchError> {
        use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
        let mut headers = HeaderMap::new();
        if let Some(key) = self.api_key.as_deref().filter(|k| !k.is_empty()) {
            let value = HeaderValue::from_str(&format!("Bearer {key}"))
                .map_err(|_| err("--api-key: not a valid header value"))?;
            headers.insert(AUTHORIZATION, value);
        }
        for (k, v) in key_values("--header", &self.header)? {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| err(format!("--header {k}={v}: not a valid header name")))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| err(format!("--header {k}={v}: not a valid header value")))?;
            headers.insert(name, value);
        }
        Ok(headers)
    }

    fn dataset(&self) -> Result<Dataset, BenchError> {
        let random_input = self.input_len.unwrap_or(self.random_input_len);
        let random_output = self.output_len.unwrap_or(self.random_output_len);
        Ok(match self.dataset_name.as_str() {
            "sharegpt" => Dataset::ShareGpt {
                path: self
                    .dataset_path
                    .clone()
                    .ok_or_else(|| err("--dataset-name sharegpt needs --dataset-path"))?,
                output_len: self.output_len.or(self.sharegpt_output_len),
            },
            "prefix" => Dataset::Prefix {
                prefix_len: self.prefix_len,
                num_prefixes: 1,
                input_len: random_input,
                output_len: random_output,
            },
            "prefix_repetition" => Dataset::Prefix {
                prefix_len: self.prefix_repetition_prefix_len,
                num_prefixes: self.prefix_repetition_num_prefixes,
                input_len: self.input_len.unwrap_or(self.prefix_repetition_suffix_len),
                output_len: self.output_len.unwrap_or(self.prefix_repetition_output_len),
            },
            _ => Dataset::Random {
                prefix_len: self.random_prefix_len,
                input_len: random_input,
                output_len: random_output,
                range_ratio: self.random_range_ratio,
            },
        })
    }
}

/// `KEY=VALUE` items of a flag, split.
fn key_values<'a>(flag: &str, items: &'a [String]) -> Result<Vec<(&'a str, &'a str)>, BenchError> {
    items
        .iter()
        .map(|item| {
            item.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| err(format!("{flag} `{item}`: expected KEY=VALUE")))
        })
        .collect()
}

/// Polls `GET {base}/v1/models` until the server answers (any status but 502-504, which a proxy
/// or a server still loading gives), for at most `timeout`.
async fn wait_until_ready(
    client: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = client.get(format!("{base}/v1/models")).send().await;
        let last = match answer {
            Ok(r) if !matches!(r.status().as_u16(), 502..=504) => return Ok(()),
            Ok(r) => format!("HTTP {}", r.status()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(err(format!(
                "{base} was not ready within {} s ({last})",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("bench: {0}")]
pub struct BenchError(String);

fn err(e: impl std::fmt::Display) -> BenchError {
    BenchError(e.to_string())
}

/// The results gathered so far, also after a request task panicked (a push is never half done).
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Resolves on Ctrl-C or SIGTERM (what `timeout` sends), so that a run cut short still reports.
async fn interrupt() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer, BenchError> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let gguf = candela_models::gguf::GgufFile::open(path).map_err(err)?;
        return gguf.tokenizer().map_err(err);
    }
    // A model config.json (as served with --load-format dummy): the synthetic tokenizer.
    if let Ok(vocab) = candela_models::dummy::config_vocab_size(path) {
        return candela_models::dummy::synthetic_tokenizer(vocab).map_err(err);
    }
    Tokenizer::from_file(path).map_err(|e| err(format!("{}: {e}", path.display())))
}

/// The tokenizer of a model given as a path, as `candela serve --model` takes one: a directory
/// with a tokenizer.json (or, served with `--load-format dummy`, only a config.json), a GGUF
/// file, or a config.json.
fn path_tokenizer(path: &std::path::Path) -> Result<Tokenizer, BenchError> {
    if !path.is_dir() {
        return load_tokenizer(path);
    }
    let file = path.join("tokenizer.json");
    if file.exists() {
        return load_tokenizer(&file);
    }
    load_tokenizer(&path.join("config.json"))
}

/// The tokenizer of a catalog model (fetched if needed).
fn catalog_tokenizer(model: &str, home: &std::path::Path) -> Result<Tokenizer, BenchError> {
    let catalog = Catalog::builtin();
    let entry = catalog.get(model).ok_or_else(|| {
        err(format!(
            "`{model}` is not a catalog id; pass --tokenizer (a tokenizer.json or GGUF file)"
        ))
    })?;
    let path = crate::fetch::fetch(entry, home).map_err(err)?;
    let file = if path.is_dir() {
        path.join("tokenizer.json")
    } else {
        path
    };
    load_tokenizer(&file)
}

fn parse_goodput(items: &[String]) -> Result<Vec<(String, f64)>, BenchError> {
    items
        .iter()
        .map(|kv| {
            let (k, v) = kv
                .split_once(':')
                .ok_or_else(|| err(format!("--goodput `{kv}`: expected METRIC:MS")))?;
            if !["ttft", "tpot", "e2el"].contains(&k) {
                return Err(err(format!(
                    "--goodput `{kv}`: metric must be ttft, tpot or e2el"
                )));
            }
            Ok((
                k.to_string(),
                v.parse::<f64>()
                    .map_err(|_| err(format!("--goodput `{kv}`: bad number")))?,
            ))
        })
        .collect()
}

/// Runs the benchmark and reports; Ctrl-C or SIGTERM ends it early with a report on the requests
/// that finished.
pub async fn run(args: BenchArgs, home: PathBuf) -> Result<(), BenchError> {
    run_until(args, home, interrupt()).await
}

/// [`run`], ended early when `stop` resolves: the requests still in flight are abandoned, and the
/// report (and saved JSON, with `interrupted` and `unfinished`) covers those that finished.
pub async fn run_until(
    args: BenchArgs,
    home: PathBuf,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), BenchError> {
    let reporting = Reporting {
        metrics: args
            .percentile_metrics
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        percentiles: args
            .metric_percentiles
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<f64>()
                    .map_err(|_| err(format!("--metric-percentiles: bad number `{p}`")))
            })
            .collect::<Result<_, _>>()?,
        goodput: parse_goodput(&args.goodput)?,
    };
    args.check()?;
    if let Some(p) = reporting
        .percentiles
        .iter()
        .find(|p| !(**p > 0.0 && **p <= 100.0))
    {
        return Err(err(format!("--metric-percentiles: {p} is not in (0, 100]")));
    }
    let base = args.base();
    let endpoint = args.endpoint()?;
    let dataset = args.dataset()?;
    let metadata = key_values("--metadata", &args.metadata)?;
    let opts = RequestOptions {
        ignore_eos: args.ignore_eos,
        body: args.request_body()?,
        request_id_prefix: args.request_id_prefix.clone(),
    };
    // A fresh connection per request: servers that drop idle keep-alive connections (llama.cpp's does)
    // would otherwise fail requests sent on a stale one.
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .default_headers(args.headers()?)
        .build()
        .map_err(err)?;
    let (backend, model_id) = if args.offline {
        let source = args
            .model
            .clone()
            .unwrap_or_else(|| "smollm2-135m-instruct".into());
        let opts = crate::serving::ServeOptions {
            sources: vec![source],
            device: candela_kernels::cuda_if_available(),
            home: home.clone(),
            kv_cache_bytes: args
                .kv_cache_memory
                .map(|g| (g * (1u64 << 30) as f64) as u64),
            block_size: 16,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: 2048,
            max_batch_prefill_tokens: 2048,
            catalog: None,
            calibrate: false,
            dummy_weights: args.load_format == "dummy",
            dtype: None,
            kv_cache_dtype: None,
            precise_prompts: crate::runner::default_precise_prompts(),
        };
        let registry = tokio::task::spawn_blocking(move || crate::serving::load_registry(&opts))
            .await
            .map_err(err)?
            .map_err(err)?;
        let chat = registry
            .models
            .iter()
            .find_map(|m| match m {
                crate::serving::Served::Chat(c) => Some(c.clone()),
                _ => None,
            })
            .ok_or_else(|| err("--offline needs a chat model"))?;
        let id = chat.info.id.clone();
        (Backend::InProcess(chat), id)
    } else {
        if args.ready_check_timeout_sec > 0 {
            let timeout = Duration::from_secs(args.ready_check_timeout_sec);
            wait_until_ready(&client, &base, timeout).await?;
        }
        // A path (as `candela serve --model` takes one) names the tokenizer, not the model: the
        // server calls that model by an id of its own.
        let named = args
            .model
            .as_ref()
            .filter(|m| !std::path::Path::new(m).exists());
        let model = match args.served_model_name.as_ref().or(named) {
            Some(m) => m.clone(),
            None => {
                let list: Value = client
                    .get(format!("{base}/v1/models"))
                    .send()
                    .await
                    .map_err(|e| {
                        let hint = if e.is_connect() {
                            " (no server answers there; --ready-check-timeout-sec waits for one)"
                        } else {
                            ""
                        };
                        err(format!("{base}/v1/models: {e}{hint}"))
                    })?
                    .json()
                    .await
                    .map_err(err)?;
                list["data"][0]["id"]
                    .as_str()
                    .ok_or_else(|| err("the server lists no model; pass --model"))?
                    .to_string()
            }
        };
        let chat = endpoint.contains("chat");
        let url = format!("{base}{endpoint}");
        (
            Backend::Http {
                client,
                base: base.clone(),
                url,
                chat,
                model: model.clone(),
            },
            model,
        )
    };
    let tokenizer_id = match &args.tokenizer {
        Some(path) => path.display().to_string(),
        None => args.model.clone().unwrap_or_else(|| model_id.clone()),
    };
    let tokenizer = match (&args.tokenizer, &backend, &args.model) {
        (Some(path), _, _) => load_tokenizer(path)?,
        (None, Backend::InProcess(chat), _) => chat.tokenizer().clone(),
        (None, _, Some(m)) if std::path::Path::new(m).exists() => {
            path_tokenizer(std::path::Path::new(m))?
        }
        (None, _, m) => catalog_tokenizer(m.as_deref().unwrap_or(&model_id), &home)?,
    };
    let requests =
        dataset::build(&dataset, &tokenizer, args.num_prompts, args.seed).map_err(err)?;
    let backend = Arc::new(backend);

    for i in 0..args.num_warmups {
        let warm = BenchRequest {
            output_len: requests[i % requests.len()].output_len.min(16),
            ..requests[i % requests.len()].clone()
        };
        let r = backend.send(&warm, &opts, None).await;
        if !r.success {
            return Err(err(format!("warm-up request failed: {}", r.error)));
        }
    }

    eprintln!(
        "Benchmarking {model_id}: {} prompts, request rate {}, burstiness {}, max concurrency {}",
        requests.len(),
        args.request_rate,
        args.burstiness,
        args.max_concurrency
            .map_or("unlimited".to_string(), |c| c.to_string())
    );
    let bar = if args.disable_tqdm {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(requests.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests [{elapsed}<{eta}]")
            .map_err(err)?,
    );
    let limit = args
        .max_concurrency
        .map(|c| Arc::new(tokio::sync::Semaphore::new(c.max(1))));
    let gaps = (args.request_rate.is_finite())
        .then(|| Gamma::new(args.burstiness, 1.0 / (args.request_rate * args.burstiness)))
        .transpose()
        .map_err(err)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let total = requests.len();
    let counters_before = backend.engine_counters().await;
    let started = Instant::now();
    // Results land here as requests finish, so that an interrupted run still reports on those.
    let finished = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total)));
    let opts = Arc::new(opts);
    let all = async {
        // Dropping the set (an interrupt) aborts the requests still in flight.
        let mut tasks = tokio::task::JoinSet::new();
        for (index, req) in requests.into_iter().enumerate() {
            let (backend, limit, bar) = (backend.clone(), limit.clone(), bar.clone());
            let (finished, opts) = (finished.clone(), opts.clone());
            let id = opts
                .request_id_prefix
                .as_ref()
                .map(|prefix| format!("{prefix}{index}"));
            tasks.spawn(async move {
                let _permit = match &limit {
                    Some(l) => Some(l.clone().acquire_owned().await),
                    None => None,
                };
                let start = started.elapsed().as_secs_f64();
                let r = RequestResult {
                    start,
                    ..backend.send(&req, &opts, id).await
                };
                bar.inc(1);
                lock(&finished).push(r);
            });
            if let Some(g) = &gaps {
                tokio::time::sleep(Duration::from_secs_f64(g.sample(&mut rng))).await;
            }
        }
        while let Some(joined) = tasks.join_next().await {
            joined.map_err(err)?;
        }
        Ok::<(), BenchError>(())
    };
    let interrupted = tokio::select! {
        done = all => {
            done?;
            false
        }
        () = stop => true,
    };
    let duration = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let mut results = std::mem::take(&mut *lock(&finished));
    // In the order they were sent, as the per-request lists of the saved JSON are.
    results.sort_by(|a, b| a.start.total_cmp(&b.start));
    if interrupted {
        eprintln!(
            "interrupted: {} of {total} requests finished; the figures below cover those",
            results.len()
        );
    }

    let mut summary = summarize(&results, duration, &reporting);
    if interrupted {
        summary.insert("interrupted".into(), json!(true));
        summary.insert("unfinished".into(), json!(total - results.len()));
    }
    if let (Some(before), Some(after)) = (counters_before, backend.engine_counters().await) {
        summary.extend(after.since(&before));
    }
    summary.insert("max_concurrency".into(), json!(args.max_concurrency));
    print!("{}", metrics::report(&summary, &reporting));
    if let Some(e) = results.iter().find(|r| !r.success) {
        eprintln!("first error: {}", e.error);
        if e.error.starts_with("HTTP 429") {
            eprintln!(
                "hint: the server rate-limited the load; pass a token of a project with higher \
                 limits (--api-key, `candela project set P --rpm 0`) or start candela with \
                 --anonymous-rpm 0"
            );
        }
    }
    if !args.save_detailed {
        for key in DETAILED_KEYS {
            summary.remove(key);
        }
    }
    let file = args
        .save_result
        .clone()
        .filter(|f| !f.is_empty())
        .or_else(|| args.result_filename.clone());
    if args.save_result.is_some() || args.append_result || file.is_some() {
        let date = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
        let backend = if args.offline {
            "candela-offline"
        } else {
            args.backend.as_str()
        };
        let label = args.label.as_deref().unwrap_or(backend);
        let rate = if args.request_rate.is_finite() {
            json!(args.request_rate)
        } else {
            json!("inf")
        };
        for (k, v) in [
            ("date", json!(date)),
            ("backend", json!(backend)),
            ("endpoint_type", json!(backend)),
            ("label", json!(label)),
            ("model_id", json!(model_id)),
            ("tokenizer_id", json!(tokenizer_id)),
            ("num_prompts", json!(args.num_prompts)),
            ("request_rate", rate.clone()),
            ("burstiness", json!(args.burstiness)),
        ] {
            summary.insert(k.into(), v);
        }
        for (k, v) in metadata {
            summary.insert(k.into(), json!(v));
        }
        let name = file.unwrap_or_else(|| {
            let rate = rate.as_str().map_or(rate.to_string(), str::to_string);
            let conc = args
                .max_concurrency
                .map_or(String::new(), |c| format!("-concurrency{c}"));
            let model = model_id.rsplit('/').next().unwrap_or(&model_id);
            format!("{label}-{rate}qps{conc}-{model}-{date}.json")
        });
        let dir = args.result_dir.clone().unwrap_or_default();
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(&dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
        }
        let path = dir.join(name);
        save(&path, &Value::Object(summary), args.append_result)
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

/// Writes the result as pretty JSON, or appends it to `path` as one JSON line (as vLLM's
/// `--append-result` does).
fn save(path: &std::path::Path, result: &Value, append: bool) -> std::io::Result<()> {
    use std::io::Write;
    if !append {
        let text = serde_json::to_vec_pretty(result).map_err(std::io::Error::other)?;
        return std::fs::write(path, text);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut line = if file.metadata()?.len() > 0 {
        b"\n".to_vec()
    } else {
        Vec::new()
    };
    serde_json::to_writer(&mut line, result).map_err(std::io::Error::other)?;
    file.write_all(&line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn parse(flags: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(flags.iter().copied()))
            .unwrap()
            .args
    }

    /// A command line written for `vllm bench serve` means the same here.
    #[test]
    fn vllm_command_lines_carry_over() {
        let a = parse(&[
            "--backend",
            "vllm",
            "--host",
            "10.0.0.5",
            "--port",
            "8000",
            "--model",
            "meta-llama/Llama-3.1-8B-Instruct",
            "--dataset-name",
            "random",
            "--input-len",
            "512",
            "--random-output-len",
            "64",
            "--random-prefix-len",
            "100",
            "--num-prompts",
            "200",
            "--temperature",
            "0.6",
            "--top-k",
            "20",
            "--extra-body",
            r#"{"min_p": 0.05, "top_k": 40}"#,
            "--header",
            "x-tenant=a",
            "x-trace = 1",
            "--metadata",
            "gpu=h100",
            "--save-result",
            "--save-detailed",
            "--trust-remote-code",
            "--disable-tqdm",
        ]);
        assert_eq!(a.base(), "http://10.0.0.5:8000");
        assert_eq!(a.endpoint().unwrap(), "/v1/completions");
        let body = a.request_body().unwrap();
        assert_eq!(body["temperature"], 0.6);
        assert_eq!(body["top_k"], 40, "--extra-body has the last word");
        assert_eq!(body["min_p"], 0.05);
        assert!(!body.contains_key("top_p"));
        let headers = a.headers().unwrap();
        assert_eq!(headers["x-tenant"], "a");
        assert_eq!(headers["x-trace"], "1");
        match a.dataset().unwrap() {
            Dataset::Random {
                prefix_len,
                input_len,
                output_len,
                ..
            } => assert_eq!((prefix_len, input_len, output_len), (100, 512, 64)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn save_result_takes_an_optional_file() {
        assert_eq!(parse(&["--save-result"]).save_result.as_deref(), Some(""));
        let a = parse(&["--save-result", "out.json", "--seed", "3"]);
        assert_eq!(a.save_result.as_deref(), Some("out.json"));
        let b = parse(&["--save-result", "--result-dir", "d"]);
        assert_eq!(b.save_result.as_deref(), Some(""));
        assert!(parse(&[]).save_result.is_none());
    }

    #[test]
    fn the_backend_picks_the_endpoint() {
        let chat = parse(&["--backend", "openai-chat"]);
        assert_eq!(chat.endpoint().unwrap(), "/v1/chat/completions");
        assert_eq!(chat.base(), "http://127.0.0.1:8080", "candela's own port");
        let wrong = parse(&["--backend", "openai-chat", "--endpoint", "/v1/completions"]);
        assert!(wrong
            .endpoint()
            .unwrap_err()
            .to_string()
            .contains("--endpoint"));
        let url = parse(&["--base-url", "http://h:1/v1/", "--host", "ignored"]);
        assert_eq!(url.base(), "http://h:1");
        assert!(Cli::try_parse_from(["bench", "--backend", "tgi"]).is_err());
    }

    #[test]
    fn general_lengths_set_each_workloads_own() {
        let a = parse(&[
            "--dataset-name",
            "prefix_repetition",
            "--prefix-repetition-num-prefixes",
            "4",
            "--input-len",
            "30",
            "--output-len",
            "9",
        ]);
        match a.dataset().unwrap() {
            Dataset::Prefix {
                prefix_len,
                num_prefixes,
                input_len,
                output_len,
            } => assert_eq!(
                (prefix_len, num_prefixes, input_len, output_len),
                (256, 4, 30, 9)
            ),
            other => panic!("{other:?}"),
        }
        let sharegpt = parse(&["--dataset-name", "sharegpt", "--dataset-path", "x.json"]);
        assert!(matches!(
            sharegpt.dataset().unwrap(),
            Dataset::ShareGpt {
                output_len: None,
                ..
            }
        ));
        assert!(parse(&["--dataset-name", "sharegpt"]).dataset().is_err());
    }

    #[test]
    fn values_no_run_can_use_are_named() {
        for (flags, named) in [
            (&["--num-prompts", "0"][..], "--num-prompts"),
            (&["--max-concurrency", "0"], "--max-concurrency"),
            (&["--random-range-ratio", "1"], "--random-range-ratio"),
            (&["--request-rate", "0"], "--request-rate"),
            (&["--output-len", "0"], "--output-len"),
            (&["--random-input-len", "0"], "--random-input-len"),
        ] {
            let e = parse(flags).check().unwrap_err().to_string();
            assert!(e.contains(named), "{flags:?}: {e}");
        }
        assert!(
            parse(&["--random-range-ratio", "0.5", "--request-rate", "4"])
                .check()
                .is_ok()
        );
    }

    #[test]
    fn bad_key_values_and_bodies_are_named() {
        let e = parse(&["--header", "novalue"]).headers().unwrap_err();
        assert!(e.to_string().contains("--header `novalue`"), "{e}");
        let e = parse(&["--header", "bad name=1"]).headers().unwrap_err();
        assert!(e.to_string().contains("header name"), "{e}");
        let e = parse(&["--extra-body", "[1]"]).request_body().unwrap_err();
        assert!(e.to_string().contains("--extra-body"), "{e}");
        assert!(key_values("--metadata", &["=x".into()]).is_err());
    }

    #[test]
    fn appended_results_are_json_lines() {
        let path = std::env::temp_dir().join(format!("candela-append-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        save(&path, &json!({"run": 1}), true).unwrap();
        save(&path, &json!({"run": 2}), true).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let runs: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(runs, [json!({"run": 1}), json!({"run": 2})]);
        save(&path, &json!({"run": 3}), false).unwrap();
        let one: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(one, json!({"run": 3}));
        std::fs::remove_file(&path).unwrap();
    }
}
