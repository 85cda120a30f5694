//! Per-request measurements and the summary `vllm bench serve` reports, under the same names.

use serde_json::{json, Map, Value};

/// What one benchmark request measured. Times in seconds.
#[derive(Clone, Debug, Default)]
pub struct RequestResult {
    pub success: bool,
    pub error: String,
    pub prompt_len: usize,
    pub output_len: usize,
    /// Time to first token.
    pub ttft: f64,
    /// Gaps between successive streamed chunks after the first.
    pub itl: Vec<f64>,
    /// End-to-end latency.
    pub latency: f64,
    /// When it was sent, in seconds from the start of the run.
    pub start: f64,
    /// The generated text (saved with `--save-detailed`).
    pub text: String,
}

/// Which metrics to report and at which percentiles; goodput SLOs in milliseconds.
#[derive(Clone, Debug)]
pub struct Reporting {
    pub metrics: Vec<String>,
    pub percentiles: Vec<f64>,
    pub goodput: Vec<(String, f64)>,
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}

fn std_dev(x: &[f64]) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / x.len() as f64).sqrt()
}

/// Percentile with linear interpolation between ranks (numpy's default, which vLLM uses).
pub fn percentile(x: &[f64], p: f64) -> f64 {
    if x.is_empty() {
        return 0.0;
    }
    let mut v = x.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0).clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

fn pct_key(p: f64) -> String {
    if p.fract() == 0.0 {
        format!("{}", p as i64)
    } else {
        format!("{p}")
    }
}

/// Time per output token after the first, per request.
fn tpot(r: &RequestResult) -> Option<f64> {
    (r.output_len > 1).then(|| (r.latency - r.ttft) / (r.output_len - 1) as f64)
}

/// The summary, with vLLM's keys (`completed`, `output_throughput`, `mean_ttft_ms`, ...).
pub fn summarize(results: &[RequestResult], duration: f64, rep: &Reporting) -> Map<String, Value> {
    let ok: Vec<&RequestResult> = results.iter().filter(|r| r.success).collect();
    let total_input: usize = ok.iter().map(|r| r.prompt_len).sum();
    let total_output: usize = ok.iter().map(|r| r.output_len).sum();
    let ms = |v: Vec<f64>| v.into_iter().map(|x| x * 1000.0).collect::<Vec<_>>();
    let ttfts = ms(ok.iter().map(|r| r.ttft).collect());
    let tpots = ms(ok.iter().filter_map(|r| tpot(r)).collect());
    let itls = ms(ok.iter().flat_map(|r| r.itl.iter().copied()).collect());
    let e2els = ms(ok.iter().map(|r| r.latency).collect());
    let duration = duration.max(1e-9);
    let mut out = Map::new();
    out.insert("duration".into(), json!(duration));
    out.insert("completed".into(), json!(ok.len()));
    out.insert("failed".into(), json!(results.len() - ok.len()));
    out.insert("total_input_tokens".into(), json!(total_input));
    out.insert("total_output_tokens".into(), json!(total_output));
    out.insert(
        "request_throughput".into(),
        json!(ok.len() as f64 / duration),
    );
    out.insert(
        "output_throughput".into(),
        json!(total_output as f64 / duration),
    );
    out.insert(
        "total_token_throughput".into(),
        json!((total_input + total_output) as f64 / duration),
    );
    let (peak_tokens, peak_requests) = peaks(&ok);
    out.insert("max_output_tokens_per_s".into(), json!(peak_tokens));
    out.insert("max_concurrent_requests".into(), json!(peak_requests));
    if !rep.goodput.is_empty() {
        let good = ok
            .iter()
            .filter(|r| {
                rep.goodput.iter().all(|(metric, slo_ms)| {
                    let v = match metric.as_str() {
                        "ttft" => Some(r.ttft),
                        "tpot" => tpot(r),
                        "e2el" => Some(r.latency),
                        _ => None,
                    };
                    v.is_none_or(|v| v * 1000.0 <= *slo_ms)
                })
            })
            .count();
        out.insert("request_goodput".into(), json!(good as f64 / duration));
    }
    for (name, values) in [
        ("ttft", &ttfts),
        ("tpot", &tpots),
        ("itl", &itls),
        ("e2el", &e2els),
    ] {
        if !rep.metrics.iter().any(|m| m == name) {
            continue;
        }
        out.insert(format!("mean_{name}_ms"), json!(mean(values)));
        out.insert(format!("median_{name}_ms"), json!(percentile(values, 50.0)));
        out.insert(format!("std_{name}_ms"), json!(std_dev(values)));
        for &p in &rep.percentiles {
            out.insert(
                format!("p{}_{name}_ms", pct_key(p)),
                json!(percentile(values, p)),
            );
        }
    }
    out.insert(
        "start_times".into(),
        json!(results.iter().map(|r| r.start).collect::<Vec<_>>()),
    );
    out.insert(
        "generated_texts".into(),
        json!(results.iter().map(|r| r.text.as_str()).collect::<Vec<_>>()),
    );
    out.insert(
        "input_lens".into(),
        json!(results.iter().map(|r| r.prompt_len).collect::<Vec<_>>()),
    );
    out.insert(
        "output_lens".into(),
        json!(results.iter().map(|r| r.output_len).collect::<Vec<_>>()),
    );
    out.insert(
        "ttfts".into(),
        json!(results.iter().map(|r| r.ttft).collect::<Vec<_>>()),
    );
    out.insert(
        "latencies".into(),
        json!(results.iter().map(|r| r.latency).collect::<Vec<_>>()),
    );
    out.insert(
        "itls".into(),
        json!(results.iter().map(|r| r.itl.clone()).collect::<Vec<_>>()),
    );
    out.insert(
        "errors".into(),
        json!(results.iter().map(|r| r.error.clone()).collect::<Vec<_>>()),
    );
    out
}

/// The run's peaks, as vLLM reports them (successful requests only): the most streamed chunks
/// that arrived within one second, over one-second bins from the first request's start; and the
/// most requests in flight at any instant, each over `[start, start + latency)` (so one that
/// ends as another starts does not overlap it).
fn peaks(ok: &[&RequestResult]) -> (f64, usize) {
    let Some(first) = ok.iter().map(|r| r.start).reduce(f64::min) else {
        return (0.0, 0);
    };
    let end = ok.iter().map(|r| r.start + r.latency).fold(first, f64::max);
    let bins = (end - first).ceil() as usize + 1;
    let mut tokens = vec![0usize; bins];
    let bin = |t: f64| ((t - first).max(0.0) as usize).min(bins - 1);
    for r in ok {
        let mut t = r.start + r.ttft;
        tokens[bin(t)] += 1;
        for gap in &r.itl {
            t += gap;
            tokens[bin(t)] += 1;
        }
    }
    // Departures sort before arrivals at the same instant.
    let mut events: Vec<(f64, i32)> = ok
        .iter()
        .flat_map(|r| [(r.start, 1), (r.start + r.latency, -1)])
        .collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, step) in events {
        now += step;
        peak = peak.max(now);
    }
    let max_tokens = tokens.iter().copied().max().unwrap_or(0);
    (max_tokens as f64, peak as usize)
}

/// The human-readable table, laid out as vLLM prints it.
pub fn report(s: &Map<String, Value>, rep: &Reporting) -> String {
    let f = |k: &str| s.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let mut out = String::new();
    let line =
        |out: &mut String, label: &str, v: String| out.push_str(&format!("{label:<40}{v:<10}\n"));
    let title = |out: &mut String, t: &str| out.push_str(&format!("{t:-^50}\n"));
    out.push_str(&format!("{:=^50}\n", " Serving Benchmark Result "));
    line(
        &mut out,
        "Successful requests:",
        format!("{}", f("completed") as u64),
    );
    line(
        &mut out,
        "Failed requests:",
        format!("{}", f("failed") as u64),
    );
    if let Some(c) = s.get("max_concurrency").and_then(Value::as_u64) {
        line(&mut out, "Maximum request concurrency:", c.to_string());
    }
    if let Some(rate) = s.get("request_rate").and_then(Value::as_f64) {
        line(
            &mut out,
            "Request rate configured (RPS):",
            format!("{rate:.2}"),
        );
    }
    line(
        &mut out,
        "Benchmark duration (s):",
        format!("{:.2}", f("duration")),
    );
    line(
        &mut out,
        "Total input tokens:",
        format!("{}", f("total_input_tokens") as u64),
    );
    line(
        &mut out,
        "Total generated tokens:",
        format!("{}", f("total_output_tokens") as u64),
    );
    line(
        &mut out,
        "Request throughput (req/s):",
        format!("{:.2}", f("request_throughput")),
    );
    if s.contains_key("request_goodput") {
        line(
            &mut out,
            "Request goodput (req/s):",
            format!("{:.2}", f("request_goodput")),
        );
    }
    line(
        &mut out,
        "Output token throughput (tok/s):",
        format!("{:.2}", f("output_throughput")),
    );
    line(
        &mut out,
        "Peak output token throughput (tok/s):",
        format!("{:.2}", f("max_output_tokens_per_s")),
    );
    line(
        &mut out,
        "Peak concurrent requests:",
        format!("{:.2}", f("max_concurrent_requests")),
    );
    line(
        &mut out,
        "Total Token throughput (tok/s):",
        format!("{:.2}", f("total_token_throughput")),
    );
    for (name, heading, short) in [
        ("ttft", " Time to First Token ", "TTFT"),
        ("tpot", " Time per Output Token (excl. 1st token) ", "TPOT"),
        ("itl", " Inter-token Latency ", "ITL"),
        ("e2el", " End-to-end Latency ", "E2EL"),
    ] {
        if !rep.metrics.iter().any(|m| m == name) {
            continue;
        }
        title(&mut out, heading);
        line(
            &mut out,
            &format!("Mean {short} (ms):"),
            format!("{:.2}", f(&format!("mean_{name}_ms"))),
        );
        line(
            &mut out,
            &format!("Median {short} (ms):"),
            format!("{:.2}", f(&format!("median_{name}_ms"))),
        );
        for &p in &rep.percentiles {
            let k = pct_key(p);
            line(
                &mut out,
                &format!("P{k} {short} (ms):"),
                format!("{:.2}", f(&format!("p{k}_{name}_ms"))),
            );
        }
    }
    if s.contains_key("engine_steps") {
        title(&mut out, " Engine Steps (candela) ");
        line(&mut out, "Steps:", format!("{}", f("engine_steps") as u64));
        line(
            &mut out,
            "Mean tokens per step:",
            format!("{:.1}", f("mean_tokens_per_step")),
        );
        line(
            &mut out,
            "Mean step (ms):",
            format!("{:.2}", f("mean_step_ms")),
        );
        line(
            &mut out,
            "Mean launch part (ms):",
            format!("{:.2}", f("mean_step_launch_ms")),
        );
        line(
            &mut out,
            "Launch share of step:",
            format!("{:.1} %", 100.0 * f("step_launch_fraction")),
        );
    }
    out.push_str(&"=".repeat(50));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep() -> Reporting {
        Reporting {
            metrics: vec!["ttft".into(), "tpot".into(), "itl".into(), "e2el".into()],
            percentiles: vec![50.0, 99.0],
            goodput: vec![("ttft".into(), 150.0)],
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&x, 50.0), 2.5);
        assert!((percentile(&x, 99.0) - 3.97).abs() < 1e-9);
        assert_eq!(percentile(&x, 0.0), 1.0);
    }

    #[test]
    fn summary_counts_tokens_throughput_and_goodput() {
        let r = |ttft: f64, ok: bool| RequestResult {
            success: ok,
            prompt_len: 10,
            output_len: 5,
            ttft,
            itl: vec![0.01; 4],
            latency: ttft + 0.04,
            ..Default::default()
        };
        let s = summarize(&[r(0.1, true), r(0.2, true), r(0.1, false)], 2.0, &rep());
        assert_eq!(s["completed"], 2);
        assert_eq!(s["failed"], 1);
        assert_eq!(s["total_output_tokens"], 10);
        assert_eq!(s["output_throughput"], 5.0);
        assert_eq!(s["total_token_throughput"], 15.0);
        assert!((s["mean_ttft_ms"].as_f64().unwrap() - 150.0).abs() < 1e-9);
        assert!((s["mean_tpot_ms"].as_f64().unwrap() - 10.0).abs() < 1e-9);
        assert_eq!(
            s["request_goodput"], 0.5,
            "one of two requests meets the 150 ms TTFT SLO"
        );
        assert!(s.contains_key("p99_itl_ms"));
        assert!(report(&s, &rep()).contains("Output token throughput (tok/s):"));
    }

    /// Chunks at 0.5, 0.7 and 0.9 s, then 1.1 and 1.2 s: three in the first second; the
    /// second request starts at 0.8 s, while the first runs. A third starts at 1.3 s, as the
    /// second ends: never three at once, though all three ran within the second second.
    #[test]
    fn peaks_count_chunks_and_requests_per_second() {
        let r = |start: f64, ttft: f64, itl: Vec<f64>, latency: f64| RequestResult {
            success: true,
            output_len: itl.len() + 1,
            start,
            ttft,
            itl,
            latency,
            ..Default::default()
        };
        let failed = RequestResult {
            start: 0.0,
            latency: 5.0,
            ..Default::default()
        };
        let s = summarize(
            &[
                r(0.0, 0.5, vec![0.2, 0.2], 0.9),
                r(0.8, 0.3, vec![0.1], 0.5),
                r(1.3, 0.6, vec![], 0.6),
                failed,
            ],
            1.3,
            &rep(),
        );
        assert_eq!(s["max_output_tokens_per_s"], 3.0);
        assert_eq!(s["max_concurrent_requests"], 2);
        assert!(report(&s, &rep()).contains("Peak concurrent requests:"));
        assert!(!report(&s, &rep()).contains("Maximum request concurrency:"));
    }
}
