//! `candela bench` against the real server and default model: vLLM's metrics and result keys,
//! vLLM's command lines, and a run cut short.

mod common;

use common::{run_bench, run_bench_until, shared, CHAT};
use serde_json::json;

/// The load generator against the real server: exact prompt lengths, the requested output
/// lengths, and vLLM's result keys.
#[tokio::test]
async fn bench_reports_what_vllm_bench_serve_reports() {
    let base = shared().base.clone();
    let s = run_bench(&[
        "--base-url",
        &base,
        "--model",
        CHAT,
        "--random-input-len",
        "32",
        "--random-output-len",
        "8",
        "--num-prompts",
        "6",
        "--max-concurrency",
        "3",
        "--ignore-eos",
        "--metric-percentiles",
        "50,99",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--goodput",
        "ttft:60000",
    ])
    .await;
    assert_eq!(s["completed"], 6);
    assert_eq!(
        s["total_input_tokens"],
        6 * 32,
        "random prompts have exact token lengths"
    );
    assert_eq!(s["total_output_tokens"], 6 * 8);
    for key in [
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "mean_ttft_ms",
        "median_ttft_ms",
        "p99_ttft_ms",
        "p50_tpot_ms",
        "mean_itl_ms",
        "p99_e2el_ms",
        "request_goodput",
        "duration",
        "max_output_tokens_per_s",
    ] {
        assert!(
            s[key].as_f64().is_some_and(|v| v > 0.0),
            "{key} = {}",
            s[key]
        );
    }
    assert_eq!(
        s["request_goodput"].as_f64(),
        s["request_throughput"].as_f64()
    );
    // Requests in flight at some point of the busiest second: at least one, at most all six.
    let peak = s["max_concurrent_requests"].as_u64().unwrap();
    assert!((1..=6).contains(&peak), "{peak} reported");
    assert!(
        s.get("ttfts").is_none(),
        "per-request lists need --save-detailed"
    );
}

/// A `vllm bench serve` command line, flags and all, works unchanged: host and port, the chat
/// backend, a shared random prefix, sampling flags, metadata and the per-request lists.
#[tokio::test]
async fn bench_takes_vllm_command_lines() {
    let base = shared().base.clone();
    let port = base.rsplit(':').next().unwrap().to_string();
    let flags = |backend: &'static str| {
        vec![
            "--backend",
            backend,
            "--host",
            "127.0.0.1",
            "--port",
            port.as_str(),
            "--model",
            CHAT,
            "--ready-check-timeout-sec",
            "30",
            "--dataset-name",
            "random",
            "--random-prefix-len",
            "8",
            "--input-len",
            "16",
            "--output-len",
            "4",
            "--num-prompts",
            "4",
            "--max-concurrency",
            "2",
            "--ignore-eos",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--top-k",
            "20",
            "--request-id-prefix",
            "bench-",
            "--disable-tqdm",
            "--trust-remote-code",
            "--tokenizer-mode",
            "auto",
            "--logprobs",
            "2",
            "--metadata",
            "run=ci",
            "--save-detailed",
        ]
    };
    let text = run_bench(&flags("vllm")).await;
    assert_eq!(text["completed"], 4, "{text}");
    assert_eq!(text["backend"], "vllm");
    assert_eq!(text["run"], "ci");
    let lens: Vec<u64> = serde_json::from_value(text["input_lens"].clone()).unwrap();
    assert_eq!(
        lens.iter().sum::<u64>(),
        text["total_input_tokens"].as_u64().unwrap()
    );
    assert!(lens.iter().all(|&n| (22..=26).contains(&n)), "{lens:?}");
    assert_eq!(text["output_lens"], json!([4, 4, 4, 4]));
    assert_eq!(text["start_times"].as_array().unwrap().len(), 4);

    let chat = run_bench(&flags("openai-chat")).await;
    assert_eq!(chat["completed"], 4, "{chat}");
    assert_eq!(chat["total_output_tokens"], 16);
    let texts = chat["generated_texts"].as_array().unwrap();
    assert!(texts.iter().all(|t| !t.as_str().unwrap().is_empty()));

    // A request rate that ramps up over the run, recorded as vLLM records it.
    let mut ramp = flags("openai");
    ramp.extend([
        "--ramp-up-strategy",
        "exponential",
        "--ramp-up-start-rps",
        "20",
        "--ramp-up-end-rps",
        "80",
    ]);
    let ramped = run_bench(&ramp).await;
    assert_eq!(ramped["completed"], 4, "{ramped}");
    assert_eq!(ramped["ramp_up_strategy"], "exponential");
    assert_eq!(ramped["ramp_up_start_rps"], 20.0);
    assert_eq!(ramped["ramp_up_end_rps"], 80.0);
    let starts: Vec<f64> = serde_json::from_value(ramped["start_times"].clone()).unwrap();
    assert!(
        starts.windows(2).all(|w| w[0] <= w[1]) && starts[3] > starts[0],
        "arrivals spread over time: {starts:?}"
    );
}

/// A run cut short (Ctrl-C, or the SIGTERM of `timeout`) abandons the requests in flight and
/// still reports, saying how many did not finish.
#[tokio::test]
async fn an_interrupted_bench_reports_the_requests_that_finished() {
    let base = shared().base.clone();
    let started = std::time::Instant::now();
    let s = run_bench_until(
        &[
            "--base-url",
            &base,
            "--model",
            CHAT,
            "--random-input-len",
            "16",
            "--random-output-len",
            "64",
            "--num-prompts",
            "200",
            "--max-concurrency",
            "2",
            "--ignore-eos",
            "--num-warmups",
            "0",
        ],
        tokio::time::sleep(std::time::Duration::from_secs(2)),
    )
    .await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "200 requests of 64 tokens were not all waited for"
    );
    assert_eq!(s["interrupted"], true);
    let (completed, unfinished) = (
        s["completed"].as_u64().unwrap(),
        s["unfinished"].as_u64().unwrap(),
    );
    assert!(unfinished > 0);
    assert_eq!(completed + unfinished + s["failed"].as_u64().unwrap(), 200);
    assert_eq!(s["total_output_tokens"].as_u64(), Some(completed * 64));
}
