//! Prometheus metrics, served at `GET /metrics`.
//!
//! Request-side metrics (counts, latencies, tokens, rate limiting) are recorded as they happen
//! into long-lived families. Engine state (queues, KV cache, prefix cache, preemptions) lives in
//! the engines, so [`Metrics::render`] takes a sample of each and encodes it from a per-scrape
//! registry after the long-lived one: one OpenMetrics exposition, each family once.
//!
//! ```
//! # use candela::platform::metrics::{EngineSample, Metrics};
//! let metrics = Metrics::new();
//! metrics.record_request("llama-3-8b", "/v1/chat/completions", 200, 0.84);
//! metrics.observe_ttft("llama-3-8b", 0.05);
//! let engine = EngineSample { model: "llama-3-8b", kv_blocks_used: 10, kv_blocks_total: 40,
//!                             ..Default::default() };
//! let body = metrics.render(&[engine]); // serve with Content-Type: CONTENT_TYPE
//! assert!(body.contains("candela_kv_cache_usage_ratio{model=\"llama-3-8b\"} 0.25"));
//! assert!(body.ends_with("# EOF\n"));
//! ```

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry, Unit};

/// The content type of [`Metrics::render`]'s output: the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const PREFIX: &str = "candela";

/// Whole requests: tens of milliseconds to a long non-streamed generation.
const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// 1 ms (cached prefix, idle server) to 60 s (long prompt behind a deep queue).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];
/// 0.5 ms to 5 s, finest around the 5-50 ms of a typical decode step.
const ITL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    model: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    model: String,
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLimitLabels {
    endpoint: String,
    limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BlockLabels {
    model: String,
    state: &'static str,
}

type ByModel<M> = Family<ModelLabels, M>;
type Ratio = Gauge<f64, AtomicU64>;
type Seconds = Counter<f64, AtomicU64>;
type Histograms<S> = Family<S, Histogram, Buckets>;

/// Makes each label set's histogram with the family's bucket bounds.
#[derive(Clone, Copy, Debug)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// One engine's state at scrape time. Fields documented as cumulative are totals since the
/// engine started; the rest are current values. Give each model at most one sample per render.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineSample<'a> {
    pub model: &'a str,
    /// Sequences running.
    pub running: u64,
    /// Requests queued, not yet running.
    pub waiting: u64,
    pub kv_blocks_used: u64,
    pub kv_blocks_total: u64,
    /// Cumulative prompt tokens looked up in the prefix cache.
    pub prefix_queried_tokens: u64,
    /// Cumulative prompt tokens of those found in the prefix cache.
    pub prefix_hit_tokens: u64,
    /// Cumulative preemptions.
    pub preemptions: u64,
    /// Cumulative tokens generated, including by requests not yet finished or aborted.
    pub generated_tokens: u64,
    /// Cumulative tokens run through the model (prompt chunks and decode steps).
    pub computed_tokens: u64,
    /// Cumulative engine steps, their wall time, and the part of it spent scheduling, building
    /// the batch and launching the forward pass (before the first wait for the device).
    pub steps: u64,
    pub step_seconds: f64,
    pub step_launch_seconds: f64,
}

/// The server's metrics: share one (`Arc<Metrics>`); every method takes `&self` and touches
/// only per-label-set atomics or a histogram's own short lock.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabels, Counter>,
    request_duration: Histograms<EndpointLabels>,
    prompt_tokens: ByModel<Counter>,
    generation_tokens: ByModel<Counter>,
    ttft: Histograms<ModelLabels>,
    itl: Histograms<ModelLabels>,
    rate_limited: Family<RateLimitLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix(PREFIX);
        let r = &mut registry;
        Self {
            requests: family(r, "requests", "Finished API requests"),
            request_duration: histograms(
                r,
                "request_duration",
                "Time from receiving an API request to sending its last byte",
                REQUEST_BUCKETS,
            ),
            prompt_tokens: family(r, "prompt_tokens", "Prompt tokens of finished requests"),
            generation_tokens: family(
                r,
                "generation_tokens",
                "Tokens generated for finished requests",
            ),
            ttft: histograms(
                r,
                "time_to_first_token",
                "Time from receiving a request to its first generated token",
                TTFT_BUCKETS,
            ),
            itl: histograms(
                r,
                "inter_token_latency",
                "Time between consecutive generated tokens of a request",
                ITL_BUCKETS,
            ),
            rate_limited: family(
                r,
                "rate_limited_requests",
                "Requests refused with 429, by limit",
            ),
            registry,
        }
    }

    /// One finished HTTP API request. `endpoint` is the route, e.g. "/v1/chat/completions";
    /// `status` the HTTP status code. `model` must be a served model's id (or a fixed stand-in
    /// such as "unknown"), never the string a client sent, so that label sets stay bounded.
    pub fn record_request(&self, model: &str, endpoint: &str, status: u16, latency_secs: f64) {
        let labels = EndpointLabels {
            model: model.to_owned(),
            endpoint: endpoint.to_owned(),
        };
        self.request_duration
            .get_or_create(&labels)
            .observe(latency_secs);
        let EndpointLabels { model, endpoint } = labels;
        let labels = StatusLabels {
            model,
            endpoint,
            status,
        };
        self.requests.get_or_create(&labels).inc();
    }

    /// Prompt and generated tokens of a finished request.
    pub fn record_tokens(&self, model: &str, input: u64, output: u64) {
        let labels = model_labels(model);
        self.prompt_tokens.get_or_create(&labels).inc_by(input);
        self.generation_tokens.get_or_create(&labels).inc_by(output);
    }

    /// Time to first token of a generation.
    pub fn observe_ttft(&self, model: &str, secs: f64) {
        self.ttft.get_or_create(&model_labels(model)).observe(secs);
    }

    /// One gap between consecutive tokens of a generation.
    pub fn observe_itl(&self, model: &str, secs: f64) {
        self.itl.get_or_create(&model_labels(model)).observe(secs);
    }

    /// A request refused with 429; `limit` names the limit that refused it: "requests",
    /// "tokens" or "embeddings_requests".
    pub fn record_rate_limited(&self, endpoint: &str, limit: &str) {
        let labels = RateLimitLabels {
            endpoint: endpoint.to_owned(),
            limit: limit.to_owned(),
        };
        self.rate_limited.get_or_create(&labels).inc();
    }

    /// The OpenMetrics text exposition, to serve as [`CONTENT_TYPE`], with the engine metrics
    /// taken from `engines`, sampled now.
    pub fn render(&self, engines: &[EngineSample]) -> String {
        let scrape = engine_registry(engines);
        let mut out = String::new();
        // Writing to a String cannot fail, and every value here is encodable (integer gauges
        // are i64, label values are escaped by the encoder).
        encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &scrape))
            .and_then(|()| encode_eof(&mut out))
            .expect("encoding metrics into a String");
        out
    }
}

/// A registry holding this scrape's engine metrics. Cumulative engine totals become counters
/// (a restarted engine reads as a counter reset, which `rate()` handles).
fn engine_registry(engines: &[EngineSample]) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    let r = &mut registry;
    let running: ByModel<Gauge> = family(r, "num_requests_running", "Sequences running");
    let waiting: ByModel<Gauge> = family(r, "num_requests_waiting", "Requests queued");
    let kv_usage: ByModel<Ratio> = family(r, "kv_cache_usage_ratio", "KV cache blocks in use");
    let kv_blocks: Family<BlockLabels, Gauge> =
        family(r, "kv_cache_blocks", "KV cache blocks, used and total");
    let prefix_queries: ByModel<Counter> = family(
        r,
        "prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache",
    );
    let prefix_hits: ByModel<Counter> = family(
        r,
        "prefix_cache_hits",
        "Prompt tokens found in the prefix cache",
    );
    let prefix_ratio: ByModel<Ratio> = family(
        r,
        "prefix_cache_hit_ratio",
        "Prefix cache hits over queries since start",
    );
    let preemptions: ByModel<Counter> = family(r, "preemptions", "Sequences preempted");
    let generated: ByModel<Counter> = family(
        r,
        "engine_generated_tokens",
        "Tokens generated, counted per step rather than at request end",
    );
    let computed: ByModel<Counter> = family(
        r,
        "engine_computed_tokens",
        "Tokens run through the model: prompt chunks and decode steps",
    );
    let steps: ByModel<Counter> = family(r, "engine_steps", "Engine steps run");
    let step_time: ByModel<Seconds> = seconds(r, "engine_step", "Wall time of the engine steps");
    let launch_time: ByModel<Seconds> = seconds(
        r,
        "engine_step_launch",
        "Part of the steps' wall time spent scheduling, building the batch and launching the \
         forward pass, before the first wait for the device",
    );

    for e in engines {
        let m = model_labels(e.model);
        running.get_or_create(&m).set(saturating_i64(e.running));
        waiting.get_or_create(&m).set(saturating_i64(e.waiting));
        kv_usage
            .get_or_create(&m)
            .set(ratio(e.kv_blocks_used, e.kv_blocks_total));
        for (state, n) in [("used", e.kv_blocks_used), ("total", e.kv_blocks_total)] {
            let model = e.model.to_owned();
            kv_blocks
                .get_or_create(&BlockLabels { model, state })
                .set(saturating_i64(n));
        }
        prefix_queries
            .get_or_create(&m)
            .inc_by(e.prefix_queried_tokens);
        prefix_hits.get_or_create(&m).inc_by(e.prefix_hit_tokens);
        prefix_ratio
            .get_or_create(&m)
            .set(ratio(e.prefix_hit_tokens, e.prefix_queried_tokens));
        preemptions.get_or_create(&m).inc_by(e.preemptions);
        generated.get_or_create(&m).inc_by(e.generated_tokens);
        computed.get_or_create(&m).inc_by(e.computed_tokens);
        steps.get_or_create(&m).inc_by(e.steps);
        step_time.get_or_create(&m).inc_by(e.step_seconds);
        launch_time.get_or_create(&m).inc_by(e.step_launch_seconds);
    }
    registry
}

/// Registers an empty family under `name` (counters get `_total` appended by the encoder) and
/// returns a handle sharing its state.
fn family<S, M>(r: &mut Registry, name: &str, help: &str) -> Family<S, M>
where
    Family<S, M>: Metric + Default + Clone,
{
    let family = Family::default();
    r.register(name, help, family.clone());
    family
}

/// Registers an empty family of counters in seconds, named `<name>_seconds_total`.
fn seconds<S>(r: &mut Registry, name: &str, help: &str) -> Family<S, Seconds>
where
    S: Clone + std::hash::Hash + Eq,
    Family<S, Seconds>: Metric,
{
    let family = Family::default();
    r.register_with_unit(name, help, Unit::Seconds, family.clone());
    family
}

/// Registers an empty family of histograms in seconds, named `<name>_seconds`.
fn histograms<S>(r: &mut Registry, name: &str, help: &str, buckets: &'static [f64]) -> Histograms<S>
where
    S: Clone + std::hash::Hash + Eq,
    Histograms<S>: Metric,
{
    let family = Family::new_with_constructor(Buckets(buckets));
    r.register_with_unit(name, help, Unit::Seconds, family.clone());
    family
}

fn model_labels(model: &str) -> ModelLabels {
    ModelLabels {
        model: model.to_owned(),
    }
}

/// `part / whole`, 0 when there is no whole yet.
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The content type of [`to_prometheus_text`]'s output: the classic Prometheus text format,
/// for scrapers and parsers that do not ask for OpenMetrics.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text into the classic Prometheus text format: a counter's HELP and TYPE
/// name its `_total` samples, and the `# UNIT` and `# EOF` lines (OpenMetrics only) go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) && !name.ends_with("_total") {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                out.push_str(&format!("{p}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use prometheus_parse::{Scrape, Value};

    use super::*;

    /// Renders `m` and parses it with prometheus-parse, keyed as the exposition writes a series,
    /// labels sorted: `name{a="x",b="y"}`; histogram buckets as `name_bucket{..,le="0.05"}`.
    ///
    /// prometheus-parse reads the classic text format. The OpenMetrics output parses as it is
    /// (`# UNIT` and `# EOF` are skipped as comments), but a counter's `x_total` sample does not
    /// match its `# TYPE x counter` line, so counters (and histograms' `_sum` and `_count`) come
    /// back untyped; Prometheus reads OpenMetrics natively, so only the values are compared.
    fn scrape(m: &Metrics, engines: &[EngineSample]) -> HashMap<String, f64> {
        let body = m.render(engines);
        let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parses");
        let key = |name: &str, labels: BTreeMap<&String, &String>| {
            let labels: Vec<_> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            format!("{name}{{{}}}", labels.join(","))
        };
        let mut series = HashMap::new();
        for s in &parsed.samples {
            match &s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => {
                    series.insert(key(&s.metric, s.labels.iter().collect()), *v);
                }
                Value::Histogram(buckets) => {
                    let le = "le".to_owned();
                    for b in buckets {
                        let bound = b.less_than.to_string();
                        let mut labels: BTreeMap<_, _> = s.labels.iter().collect();
                        labels.insert(&le, &bound);
                        series.insert(key(&format!("{}_bucket", s.metric), labels), b.count);
                    }
                }
                Value::Summary(_) => panic!("no summaries here"),
            }
        }
        series
    }

    fn assert_series(scraped: &HashMap<String, f64>, expected: &[(&str, f64)]) {
        for (series, value) in expected {
            let got = scraped.get(*series);
            assert!(
                got.is_some_and(|v| (v - value).abs() < 1e-9),
                "{series}: {got:?}"
            );
        }
    }

    #[test]
    fn request_metrics_are_counted_per_label_set() {
        let m = Metrics::new();
        m.record_request("llama", "/chat", 200, 0.3);
        m.record_request("llama", "/chat", 200, 0.7);
        m.record_request("llama", "/chat", 400, 0.001);
        m.record_request("qwen", "/embed", 200, 0.02);
        m.record_tokens("llama", 120, 30);
        m.record_tokens("llama", 80, 20);
        m.observe_ttft("llama", 0.04);
        (0..10).for_each(|_| m.observe_itl("llama", 0.02));
        m.record_rate_limited("/chat", "tokens");
        m.record_rate_limited("/chat", "tokens");

        let duration = "candela_request_duration_seconds";
        let ttft = "candela_time_to_first_token_seconds";
        #[rustfmt::skip]
        let expected = [
            (r#"candela_requests_total{endpoint="/chat",model="llama",status="200"}"#, 2.0),
            (r#"candela_requests_total{endpoint="/chat",model="llama",status="400"}"#, 1.0),
            (r#"candela_requests_total{endpoint="/embed",model="qwen",status="200"}"#, 1.0),
            (&format!(r#"{duration}_count{{endpoint="/chat",model="llama"}}"#), 3.0),
            (&format!(r#"{duration}_sum{{endpoint="/chat",model="llama"}}"#), 1.001),
            (&format!(r#"{duration}_bucket{{endpoint="/chat",le="0.01",model="llama"}}"#), 1.0),
            (&format!(r#"{duration}_bucket{{endpoint="/chat",le="0.25",model="llama"}}"#), 1.0),
            (&format!(r#"{duration}_bucket{{endpoint="/chat",le="0.5",model="llama"}}"#), 2.0),
            (&format!(r#"{duration}_bucket{{endpoint="/chat",le="1",model="llama"}}"#), 3.0),
            (&format!(r#"{duration}_bucket{{endpoint="/chat",le="inf",model="llama"}}"#), 3.0),
            (r#"candela_prompt_tokens_total{model="llama"}"#, 200.0),
            (r#"candela_generation_tokens_total{model="llama"}"#, 50.0),
            (&format!(r#"{ttft}_count{{model="llama"}}"#), 1.0),
            (&format!(r#"{ttft}_bucket{{le="0.025",model="llama"}}"#), 0.0),
            (&format!(r#"{ttft}_bucket{{le="0.05",model="llama"}}"#), 1.0),
            (r#"candela_inter_token_latency_seconds_count{model="llama"}"#, 10.0),
            (r#"candela_inter_token_latency_seconds_sum{model="llama"}"#, 0.2),
            (r#"candela_rate_limited_requests_total{endpoint="/chat",limit="tokens"}"#, 2.0),
        ];
        assert_series(&scrape(&m, &[]), &expected);
    }

    #[test]
    fn engine_samples_are_rendered_as_sampled() {
        let m = Metrics::new();
        let llama = EngineSample {
            model: "llama",
            running: 3,
            waiting: 7,
            kv_blocks_used: 30,
            kv_blocks_total: 120,
            prefix_queried_tokens: 1000,
            prefix_hit_tokens: 250,
            preemptions: 2,
            generated_tokens: 4096,
            computed_tokens: 9000,
            steps: 500,
            step_seconds: 12.5,
            step_launch_seconds: 2.25,
        };
        let idle = EngineSample {
            model: "idle",
            ..Default::default()
        };
        #[rustfmt::skip]
        let expected = [
            (r#"candela_num_requests_running{model="llama"}"#, 3.0),
            (r#"candela_num_requests_waiting{model="llama"}"#, 7.0),
            (r#"candela_kv_cache_usage_ratio{model="llama"}"#, 0.25),
            (r#"candela_kv_cache_blocks{model="llama",state="used"}"#, 30.0),
            (r#"candela_kv_cache_blocks{model="llama",state="total"}"#, 120.0),
            (r#"candela_prefix_cache_queries_total{model="llama"}"#, 1000.0),
            (r#"candela_prefix_cache_hits_total{model="llama"}"#, 250.0),
            (r#"candela_prefix_cache_hit_ratio{model="llama"}"#, 0.25),
            (r#"candela_preemptions_total{model="llama"}"#, 2.0),
            (r#"candela_engine_generated_tokens_total{model="llama"}"#, 4096.0),
            (r#"candela_engine_computed_tokens_total{model="llama"}"#, 9000.0),
            (r#"candela_engine_steps_total{model="llama"}"#, 500.0),
            (r#"candela_engine_step_seconds_total{model="llama"}"#, 12.5),
            (r#"candela_engine_step_launch_seconds_total{model="llama"}"#, 2.25),
            // No blocks and no lookups yet read 0, not NaN.
            (r#"candela_kv_cache_usage_ratio{model="idle"}"#, 0.0),
            (r#"candela_prefix_cache_hit_ratio{model="idle"}"#, 0.0),
        ];
        assert_series(&scrape(&m, &[llama, idle]), &expected);

        // Each scrape shows only what it was given.
        let later = EngineSample {
            prefix_queried_tokens: 1500,
            ..llama
        };
        let s = scrape(&m, &[later]);
        assert_series(
            &s,
            &[(
                r#"candela_prefix_cache_queries_total{model="llama"}"#,
                1500.0,
            )],
        );
        assert!(!s.keys().any(|k| k.contains(r#"model="idle""#)));
    }

    #[test]
    fn exposition_is_one_openmetrics_document() {
        let m = Metrics::new();
        m.record_request("a", "/v1/completions", 200, 0.1);
        m.record_tokens("we\"ird\nmodel", 1, 1);
        let body = m.render(&[EngineSample {
            model: "a",
            ..Default::default()
        }]);
        let mut families: Vec<_> = body.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let n = families.len();
        families.sort();
        families.dedup();
        assert_eq!(n, families.len(), "a family is described twice:\n{body}");
        assert!(body.contains("# HELP candela_requests Finished API requests."));
        assert!(body.contains("# UNIT candela_request_duration_seconds seconds"));
        assert!(body.ends_with("# EOF\n") && body.matches("# EOF").count() == 1);
        assert!(body.contains(r#"candela_prompt_tokens_total{model="we\"ird\nmodel"} 1"#));
    }

    #[test]
    fn metrics_are_shared_across_threads() {
        let m = std::sync::Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| m.observe_itl("llama", 0.01)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().expect("thread"));
        let s = scrape(&m, &[]);
        assert_eq!(
            s[r#"candela_inter_token_latency_seconds_count{model="llama"}"#],
            4000.0
        );
    }
}
