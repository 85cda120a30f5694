//! `candela bench`: a serving benchmark for any OpenAI-compatible server (or an in-process
//! engine), with `vllm bench serve`'s flags, metrics and result keys, so results can be diffed.

mod args;
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

pub use args::BenchArgs;
use args::{key_values, parse_goodput};
pub use client::{Backend, RequestOptions};
pub use dataset::{BenchRequest, Dataset};
pub use metrics::{percentile, summarize, Reporting, RequestResult};

use crate::catalog::Catalog;

/// Keys of the saved JSON that list a value per request; kept only with `--save-detailed`.
const DETAILED_KEYS: [&str; 7] = [
    "start_times",
    "input_lens",
    "output_lens",
    "ttfts",
    "itls",
    "generated_texts",
    "errors",
];

/// Polls `GET {base}/v1/models` until the server answers (any status but 502-504, which a proxy
/// or a server still loading gives), for at most `timeout`.
async fn wait_until_ready(
    client: &reqwest::Client,
    base: &str,
    timeout: Duration,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        // A server that takes the connection but never answers must not outlast the deadline.
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        let answer = tokio::time::timeout(wait, client.get(format!("{base}/v1/models")).send());
        let last = match answer.await {
            Ok(Ok(r)) if !matches!(r.status().as_u16(), 502..=504) => return Ok(()),
            Ok(Ok(r)) => format!("HTTP {}", r.status()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer".to_string(),
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
/// The handlers are installed when this is called, not when the future is first polled: a
/// signal during start-up (loading, the ready check, warm-ups) ends the run as one later does.
fn interrupt() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = ctrl_c.await;
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
        .find(|p| !(**p >= 0.0 && **p <= 100.0))
    {
        return Err(err(format!("--metric-percentiles: {p} is not in [0, 100]")));
    }
    let base = args.base();
    let endpoint = args.endpoint()?;
    let dataset = args.dataset()?;
    let metadata = key_values("--metadata", &args.metadata)?;
    let opts = RequestOptions {
        // As vLLM's benchmark does: random tokens have no natural end, so random prompts
        // always generate their full length.
        ignore_eos: args.ignore_eos || args.dataset_name == "random",
        body: args.request_body()?,
        request_id_prefix: args.request_id_prefix.clone(),
        logprobs: args.logprobs,
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
            device: crate::serving::parse_device(&args.device).map_err(err)?,
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
        (Some(path), _, _) => path_tokenizer(path)?,
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

    let rate = match args.ramp() {
        Some((strategy, start, end)) => format!("{strategy} ramp {start} -> {end}"),
        None => args.request_rate.to_string(),
    };
    eprintln!(
        "Benchmarking {model_id}: {} prompts, request rate {rate}, burstiness {}, max concurrency {}",
        requests.len(),
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
    let total = requests.len();
    // The gap after request `i`: gamma-distributed around the rate at that point of the run.
    let gap = |i: usize, rng: &mut rand::rngs::StdRng| -> Result<Option<f64>, BenchError> {
        let rate = args.rate_at(i, total);
        if !rate.is_finite() {
            return Ok(None);
        }
        let gamma = Gamma::new(args.burstiness, 1.0 / (rate * args.burstiness)).map_err(err)?;
        Ok(Some(gamma.sample(rng)))
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
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
            if let Some(seconds) = gap(index, &mut rng)? {
                tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
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
    if args.request_rate.is_finite() {
        summary.insert("request_rate".into(), json!(args.request_rate));
    }
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
            ("label", json!(args.label)),
            ("model_id", json!(model_id)),
            ("tokenizer_id", json!(tokenizer_id)),
            ("num_prompts", json!(args.num_prompts)),
            ("request_rate", rate.clone()),
            ("burstiness", json!(args.burstiness)),
        ] {
            summary.insert(k.into(), v);
        }
        if let Some((strategy, start, end)) = args.ramp() {
            summary.insert("ramp_up_strategy".into(), json!(strategy));
            summary.insert("ramp_up_start_rps".into(), json!(start));
            summary.insert("ramp_up_end_rps".into(), json!(end));
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
            let rate = match args.ramp() {
                Some((strategy, start, end)) => format!("ramp-up-{strategy}-{start}qps-{end}"),
                None => rate,
            };
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
