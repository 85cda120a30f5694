//! `candela bench`'s command line: vLLM's `bench serve` flags, what they mean together, and the
//! values no run can use.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::{err, BenchError, Dataset};

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
    /// Input length (sets --random-input-len, as vLLM's does).
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
    /// ShareGPT and prefix workloads: keep the file's (or the prefixes') order rather than a
    /// seeded random one.
    #[arg(long)]
    pub disable_shuffle: bool,
    /// ShareGPT: with fewer usable conversations than --num-prompts, run those rather than
    /// repeat some at random to make up the number.
    #[arg(long)]
    pub no_oversample: bool,
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
    /// Generate exactly the requested output length (ignore end-of-sequence). Always on with
    /// --dataset-name random, as in vLLM's benchmark.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature (default 0: greedy, as vLLM's benchmark sends).
    #[arg(long, allow_negative_numbers = true, help_heading = "Sampling")]
    pub temperature: Option<f64>,
    #[arg(long, allow_negative_numbers = true, help_heading = "Sampling")]
    pub top_p: Option<f64>,
    #[arg(long, allow_negative_numbers = true, help_heading = "Sampling")]
    pub top_k: Option<i64>,
    #[arg(long, allow_negative_numbers = true, help_heading = "Sampling")]
    pub min_p: Option<f64>,
    #[arg(long, allow_negative_numbers = true, help_heading = "Sampling")]
    pub frequency_penalty: Option<f64>,
    #[arg(long, allow_negative_numbers = true, help_heading = "Sampling")]
    pub presence_penalty: Option<f64>,
    #[arg(long, allow_negative_numbers = true, help_heading = "Sampling")]
    pub repetition_penalty: Option<f64>,
    /// A JSON object merged into every request's body, e.g. `--extra-body '{"top_k": 20}'`.
    #[arg(long, value_name = "JSON", help_heading = "Sampling")]
    pub extra_body: Option<String>,
    /// Send each request with `x-request-id: PREFIX<index>`.
    #[arg(long)]
    pub request_id_prefix: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// tokenizer.json, a GGUF file, a model directory holding a tokenizer.json, or a model
    /// config.json served with `--load-format dummy` (its synthetic tokenizer), used to make
    /// prompts of exact token lengths. Default: the in-process model's own with --offline, else
    /// that of --model (a path, or a catalog id).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Accepted for vLLM's command lines; candela runs no model code, so it changes nothing.
    #[arg(long, hide = true)]
    pub trust_remote_code: bool,
    /// Accepted for vLLM's command lines; candela reads every tokenizer with the `tokenizers`
    /// library, whatever the mode.
    #[arg(long, hide = true)]
    pub tokenizer_mode: Option<String>,
    /// Ask for this many log-probabilities per generated token in every request (the top
    /// alternatives; 0: the chosen token's own), as `logprobs` (completions) or `logprobs` +
    /// `top_logprobs` (chat).
    #[arg(long, value_name = "N")]
    pub logprobs: Option<u32>,
    /// Ramp the request rate over the run instead of a fixed --request-rate: from
    /// --ramp-up-start-rps for the first request to --ramp-up-end-rps for the last, in even
    /// steps (`linear`) or by a constant factor (`exponential`); arrivals stay Poisson (or gamma
    /// with --burstiness) around the current rate.
    #[arg(long, value_parser = ["linear", "exponential"])]
    pub ramp_up_strategy: Option<String>,
    /// The first request's rate with --ramp-up-strategy (requests per second).
    #[arg(long, value_name = "RPS")]
    pub ramp_up_start_rps: Option<f64>,
    /// The last request's rate with --ramp-up-strategy (requests per second).
    #[arg(long, value_name = "RPS")]
    pub ramp_up_end_rps: Option<f64>,
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
    /// Also save the per-request lists start_times, input_lens, output_lens, ttfts, itls,
    /// generated_texts and errors (`latencies` are always saved, as vLLM saves them).
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
    /// Device for --offline: `auto` (the first CUDA GPU if this build has CUDA and the machine a
    /// GPU, else the CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
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
    pub(super) fn check(&self) -> Result<(), BenchError> {
        // Written so that NaN fails too.
        let positive = |x: f64| x > 0.0;
        if !positive(self.request_rate) || !positive(self.burstiness) {
            return Err(err("--request-rate and --burstiness must be positive"));
        }
        if let Some(strategy) = &self.ramp_up_strategy {
            if self.request_rate.is_finite() {
                return Err(err(
                    "--ramp-up-strategy sets the request rate: leave out --request-rate",
                ));
            }
            let (Some(start), Some(end)) = (self.ramp_up_start_rps, self.ramp_up_end_rps) else {
                return Err(err(
                    "--ramp-up-strategy needs --ramp-up-start-rps and --ramp-up-end-rps",
                ));
            };
            if !(positive(start) && start.is_finite() && end.is_finite() && start <= end) {
                return Err(err(format!(
                    "--ramp-up-start-rps and --ramp-up-end-rps must be positive, the start no \
                     more than the end (got {start} and {end}, {strategy})"
                )));
            }
        } else if self.ramp_up_start_rps.is_some() || self.ramp_up_end_rps.is_some() {
            return Err(err(
                "--ramp-up-start-rps and --ramp-up-end-rps need --ramp-up-strategy",
            ));
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

    /// The ramp, when there is one: (strategy, start rate, end rate).
    pub(super) fn ramp(&self) -> Option<(&str, f64, f64)> {
        Some((
            self.ramp_up_strategy.as_deref()?,
            self.ramp_up_start_rps?,
            self.ramp_up_end_rps?,
        ))
    }

    /// The arrival rate for request `index` of `total` (requests per second; infinite: all at
    /// once): --request-rate, or the ramp's rate at that point of the run.
    pub(super) fn rate_at(&self, index: usize, total: usize) -> f64 {
        let Some((strategy, start, end)) = self.ramp() else {
            return self.request_rate;
        };
        let progress = index as f64 / total.saturating_sub(1).max(1) as f64;
        match strategy {
            "exponential" => start * (end / start).powf(progress),
            _ => start + (end - start) * progress,
        }
    }

    /// The server's root URL.
    pub(super) fn base(&self) -> String {
        let url = match &self.base_url {
            Some(u) => u.clone(),
            // An IPv6 address goes in brackets.
            None if self.host.contains(':') && !self.host.starts_with('[') => {
                format!("http://[{}]:{}", self.host, self.port)
            }
            None => format!("http://{}:{}", self.host, self.port),
        };
        url.trim_end_matches('/')
            .trim_end_matches("/v1")
            .to_string()
    }

    pub(super) fn endpoint(&self) -> Result<String, BenchError> {
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
    pub(super) fn request_body(&self) -> Result<serde_json::Map<String, Value>, BenchError> {
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

    pub(super) fn headers(&self) -> Result<reqwest::header::HeaderMap, BenchError> {
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

    pub(super) fn dataset(&self) -> Result<Dataset, BenchError> {
        let random_input = self.input_len.unwrap_or(self.random_input_len);
        let random_output = self.output_len.unwrap_or(self.random_output_len);
        Ok(match self.dataset_name.as_str() {
            "sharegpt" => Dataset::ShareGpt {
                path: self
                    .dataset_path
                    .clone()
                    .ok_or_else(|| err("--dataset-name sharegpt needs --dataset-path"))?,
                output_len: self.output_len.or(self.sharegpt_output_len),
                shuffle: !self.disable_shuffle,
                oversample: !self.no_oversample,
            },
            "prefix" => Dataset::Prefix {
                prefix_len: self.prefix_len,
                num_prefixes: 1,
                input_len: random_input,
                output_len: random_output,
                shuffle: !self.disable_shuffle,
            },
            "prefix_repetition" => Dataset::Prefix {
                prefix_len: self.prefix_repetition_prefix_len,
                num_prefixes: self.prefix_repetition_num_prefixes,
                input_len: self.prefix_repetition_suffix_len,
                output_len: self.output_len.unwrap_or(self.prefix_repetition_output_len),
                shuffle: !self.disable_shuffle,
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
pub(super) fn key_values<'a>(
    flag: &str,
    items: &'a [String],
) -> Result<Vec<(&'a str, &'a str)>, BenchError> {
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

/// `--goodput` items as (metric, milliseconds).
pub(super) fn parse_goodput(items: &[String]) -> Result<Vec<(String, f64)>, BenchError> {
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
    fn negative_sampling_values_and_ipv6_hosts_parse() {
        let a = parse(&[
            "--top-k",
            "-1",
            "--presence-penalty",
            "-0.5",
            "--host",
            "::1",
        ]);
        let body = a.request_body().unwrap();
        assert_eq!(
            (body["top_k"].clone(), body["presence_penalty"].clone()),
            (json!(-1), json!(-0.5))
        );
        assert_eq!(a.base(), "http://[::1]:8080");
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
                ..
            } => assert_eq!(
                (prefix_len, num_prefixes, input_len, output_len),
                (256, 4, 256, 9),
                "--input-len sets only --random-input-len, as in vLLM"
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
            (&["--ramp-up-strategy", "linear"], "--ramp-up-start-rps"),
            (&["--ramp-up-start-rps", "1"], "--ramp-up-strategy"),
            (
                &[
                    "--ramp-up-strategy",
                    "linear",
                    "--ramp-up-start-rps",
                    "1",
                    "--ramp-up-end-rps",
                    "5",
                    "--request-rate",
                    "2",
                ],
                "--request-rate",
            ),
            (
                &[
                    "--ramp-up-strategy",
                    "exponential",
                    "--ramp-up-start-rps",
                    "0",
                    "--ramp-up-end-rps",
                    "5",
                ],
                "--ramp-up-start-rps",
            ),
            (
                &[
                    "--ramp-up-strategy",
                    "linear",
                    "--ramp-up-start-rps",
                    "9",
                    "--ramp-up-end-rps",
                    "5",
                ],
                "--ramp-up-start-rps",
            ),
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

    /// The first request arrives at the start rate, the last at the end rate; in between, even
    /// steps (linear) or a constant factor (exponential). Without a ramp, --request-rate.
    #[test]
    fn ramps_go_from_the_start_rate_to_the_end_rate() {
        let ramp = |strategy: &str| {
            parse(&[
                "--ramp-up-strategy",
                strategy,
                "--ramp-up-start-rps",
                "1",
                "--ramp-up-end-rps",
                "16",
            ])
        };
        let linear = ramp("linear");
        assert!(linear.check().is_ok());
        let rates: Vec<f64> = (0..6).map(|i| linear.rate_at(i, 6)).collect();
        assert_eq!(rates, [1.0, 4.0, 7.0, 10.0, 13.0, 16.0]);
        let exponential = ramp("exponential");
        let rates: Vec<f64> = (0..5).map(|i| exponential.rate_at(i, 5)).collect();
        assert_eq!(rates, [1.0, 2.0, 4.0, 8.0, 16.0]);
        assert_eq!(linear.rate_at(0, 1), 1.0, "one request: the start rate");
        assert_eq!(parse(&["--request-rate", "3"]).rate_at(7, 10), 3.0);
        assert!(parse(&[]).rate_at(0, 10).is_infinite());
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
}
