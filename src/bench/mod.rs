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

pub use client::Backend;
pub use dataset::{BenchRequest, Dataset};
pub use metrics::{percentile, summarize, Reporting, RequestResult};

use crate::catalog::Catalog;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Server to benchmark (any OpenAI-compatible API: candela, vLLM, llama.cpp's server).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub base_url: String,
    /// API key sent as `Authorization: Bearer KEY` (a candela access token, so that the load
    /// counts against that project's rate limits rather than the anonymous ones).
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// API path: /v1/completions (prompt text) or /v1/chat/completions (one user message).
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// Model id to request. Default: the first model the server lists. With --offline: a catalog
    /// id or a path to load in-process.
    #[arg(long)]
    pub model: Option<String>,
    /// Workload: random (random tokens of the given lengths), sharegpt (--dataset-path), or prefix
    /// (a shared --prefix-len prefix followed by random suffixes of --random-input-len).
    #[arg(long, default_value = "random", value_parser = ["random", "sharegpt", "prefix"])]
    pub dataset_name: String,
    /// ShareGPT-style JSON or JSONL file.
    #[arg(long)]
    pub dataset_path: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    pub random_input_len: usize,
    #[arg(long, default_value_t = 128)]
    pub random_output_len: usize,
    /// Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)].
    #[arg(long, default_value_t = 0.0)]
    pub random_range_ratio: f64,
    /// Shared prefix length for --dataset-name prefix.
    #[arg(long, default_value_t = 256)]
    pub prefix_len: usize,
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
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tokenizer.json, a GGUF file, or a model config.json served with `--load-format dummy`
    /// (its synthetic tokenizer), used to make prompts of exact token lengths. Default: the
    /// catalog model's tokenizer when --model is a catalog id.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Requests sent (one at a time) before measuring.
    #[arg(long, default_value_t = 1)]
    pub num_warmups: usize,
    /// Comma-separated metrics to report: ttft, tpot, itl, e2el.
    #[arg(long, default_value = "ttft,tpot,itl")]
    pub percentile_metrics: String,
    /// Comma-separated percentiles to report.
    #[arg(long, default_value = "99")]
    pub metric_percentiles: String,
    /// Service-level objectives for goodput, e.g. `--goodput ttft:500 tpot:50` (milliseconds).
    #[arg(long, num_args = 1..)]
    pub goodput: Vec<String>,
    /// Write the results as JSON (vLLM's keys).
    #[arg(long)]
    pub save_result: bool,
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
    // Written so that NaN fails too.
    let positive = |x: f64| x > 0.0;
    if !positive(args.request_rate) || !positive(args.burstiness) {
        return Err(err("--request-rate and --burstiness must be positive"));
    }
    let base = args
        .base_url
        .trim_end_matches('/')
        .trim_end_matches("/v1")
        .to_string();
    // A fresh connection per request: servers that drop idle keep-alive connections (llama.cpp's does)
    // would otherwise fail requests sent on a stale one.
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = args.api_key.as_deref().filter(|k| !k.is_empty()) {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| err("--api-key: not a valid header value"))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .default_headers(headers)
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
        let model = match &args.model {
            Some(m) => m.clone(),
            None => {
                let list: Value = client
                    .get(format!("{base}/v1/models"))
                    .send()
                    .await
                    .map_err(|e| err(format!("{base}/v1/models: {e}")))?
                    .json()
                    .await
                    .map_err(err)?;
                list["data"][0]["id"]
                    .as_str()
                    .ok_or_else(|| err("the server lists no model; pass --model"))?
                    .to_string()
            }
        };
        let chat = args.endpoint.contains("chat");
        let url = format!("{base}{}", args.endpoint);
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
    let tokenizer = match &args.tokenizer {
        Some(path) => load_tokenizer(path)?,
        None => catalog_tokenizer(&model_id, &home)?,
    };
    let dataset = match args.dataset_name.as_str() {
        "sharegpt" => Dataset::ShareGpt {
            path: args
                .dataset_path
                .clone()
                .ok_or_else(|| err("--dataset-name sharegpt needs --dataset-path"))?,
            output_len: args.sharegpt_output_len,
        },
        "prefix" => Dataset::Prefix {
            prefix_len: args.prefix_len,
            input_len: args.random_input_len,
            output_len: args.random_output_len,
        },
        _ => Dataset::Random {
            input_len: args.random_input_len,
            output_len: args.random_output_len,
            range_ratio: args.random_range_ratio,
        },
    };
    let requests =
        dataset::build(&dataset, &tokenizer, args.num_prompts, args.seed).map_err(err)?;
    let backend = Arc::new(backend);

    for i in 0..args.num_warmups {
        let warm = BenchRequest {
            output_len: requests[i % requests.len()].output_len.min(16),
            ..requests[i % requests.len()].clone()
        };
        let r = backend.send(&warm, args.ignore_eos).await;
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
    let bar = ProgressBar::new(requests.len() as u64);
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
    let all = async {
        // Dropping the set (an interrupt) aborts the requests still in flight.
        let mut tasks = tokio::task::JoinSet::new();
        for req in requests {
            let (backend, limit, bar) = (backend.clone(), limit.clone(), bar.clone());
            let finished = finished.clone();
            let ignore_eos = args.ignore_eos;
            tasks.spawn(async move {
                let _permit = match &limit {
                    Some(l) => Some(l.clone().acquire_owned().await),
                    None => None,
                };
                let start = started.elapsed().as_secs_f64();
                let r = RequestResult {
                    start,
                    ..backend.send(&req, ignore_eos).await
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
    if args.save_result || args.result_filename.is_some() {
        let date = chrono::Local::now().format("%Y%m%d-%H%M%S").to_string();
        for (k, v) in [
            ("date", json!(date)),
            (
                "backend",
                json!(if args.offline {
                    "candela-offline"
                } else {
                    "openai"
                }),
            ),
            ("model_id", json!(model_id)),
            ("num_prompts", json!(args.num_prompts)),
            (
                "request_rate",
                if args.request_rate.is_finite() {
                    json!(args.request_rate)
                } else {
                    json!("inf")
                },
            ),
            ("burstiness", json!(args.burstiness)),
        ] {
            summary.insert(k.into(), v);
        }
        let name = args.result_filename.clone().unwrap_or_else(|| {
            let rate = if args.request_rate.is_finite() {
                args.request_rate.to_string()
            } else {
                "inf".into()
            };
            let conc = args
                .max_concurrency
                .map_or(String::new(), |c| format!("-concurrency{c}"));
            format!(
                "candela-{rate}qps{conc}-{}-{date}.json",
                model_id.replace('/', "_")
            )
        });
        let path = args.result_dir.clone().unwrap_or_default().join(name);
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&Value::Object(summary)).map_err(err)?,
        )
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}
