//! Servers with their own settings: memory pressure (preemption), graceful shutdown, client
//! disconnects, and a model loaded from a Hugging Face directory.

mod common;

use std::time::{Duration, Instant};

use candela::engine::EngineStats;
use candela::serving::ServeOptions;
use common::{chat, options, start, stream, stream_text};
use futures::StreamExt;
use serde_json::json;

/// A KV cache too small for the load forces preemption; every request still completes with the
/// text it produces alone.
#[tokio::test]
async fn preempted_requests_recompute_and_finish_with_the_same_text() {
    preempted_requests_finish_alike(true).await;
}

/// The same with `--prompt-precision int8`: every token in one int8 term (by default prompt
/// tokens take two, generated tokens one, also when a preempted request recomputes them).
#[tokio::test]
async fn with_int8_prompts_preempted_requests_finish_with_the_same_text() {
    preempted_requests_finish_alike(false).await;
}

async fn preempted_requests_finish_alike(precise_prompts: bool) {
    // 48 blocks of 16 tokens: ~770 tokens for 8 requests that want ~140 each.
    let bytes_per_block = 2 * 30 * 16 * 3 * 64 * 2;
    let server = start(ServeOptions {
        precise_prompts,
        ..options(48 * bytes_per_block)
    });
    let body = |i: usize| {
        chat(
            &format!("Describe city number {i} in detail."),
            json!({"temperature": 0, "max_tokens": 100, "ignore_eos": true, "stream": true}),
        )
    };
    let mut solo = Vec::new();
    for i in 0..2 {
        let (events, done) = stream(&server.base, "/v1/chat/completions", body(i)).await;
        assert!(done);
        solo.push(stream_text(&events));
    }
    let all = futures::future::join_all(
        (0..8).map(|i| stream(&server.base, "/v1/chat/completions", body(i))),
    )
    .await;
    for (i, (events, done)) in all.iter().enumerate() {
        assert!(done, "request {i} finished");
        let usage_tokens: usize = events
            .iter()
            .filter(|e| e["choices"][0]["delta"]["content"].is_string())
            .count();
        assert!(usage_tokens > 0);
    }
    let stats = server.chat_stats();
    assert!(
        EngineStats::get(&stats.preemptions) > 0,
        "the load did not preempt; the test needs a smaller cache"
    );
    for (i, text) in solo.iter().enumerate() {
        assert_eq!(
            &stream_text(&all[i].0),
            text,
            "request {i} changed after preemption"
        );
    }
}

/// On shutdown, an in-flight stream ends with an error event instead of hanging.
#[tokio::test]
async fn shutdown_ends_in_flight_streams_with_an_error() {
    let mut server = start(options(256 << 20));
    let base = server.base.clone();
    let task = tokio::spawn(async move {
        stream(
            &base,
            "/v1/chat/completions",
            chat(
                "Tell me a long story.",
                json!({"stream": true, "max_tokens": 3000, "ignore_eos": true}),
            ),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.shut_down();
    let (events, _) = tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("stream ended")
        .unwrap();
    let last = events.last().expect("some events");
    assert!(
        last.get("error").is_some(),
        "last event is an error: {last}"
    );
}

/// A client that goes away mid-stream cancels its request: the engine stops generating for it and
/// its KV blocks go back to the pool within a step or two.
#[tokio::test]
async fn a_client_that_disconnects_mid_stream_frees_its_blocks() {
    let server = start(options(256 << 20));
    let stats = server.chat_stats();
    let body = chat(
        "Tell me a very long story.",
        json!({"stream": true, "max_tokens": 4000, "ignore_eos": true}),
    );
    let resp = common::client()
        .post(format!("{}/v1/chat/completions", server.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut bytes = resp.bytes_stream();
    for _ in 0..5 {
        bytes.next().await.unwrap().unwrap();
    }
    assert!(
        EngineStats::get(&stats.kv_blocks_used) > 0,
        "the running request holds blocks"
    );
    drop(bytes);
    let left = Instant::now();
    while EngineStats::get(&stats.running) > 0 || EngineStats::get(&stats.kv_blocks_used) > 0 {
        assert!(
            left.elapsed() < Duration::from_secs(2),
            "blocks still held {:?} after the client left",
            left.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let generated = EngineStats::get(&stats.generated_tokens);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        EngineStats::get(&stats.generated_tokens),
        generated,
        "generation stopped"
    );
}

/// `--model DIR` with a Hugging Face Llama directory (float32 safetensors, tokenizer.json, chat
/// template in tokenizer_config.json), made from the default GGUF by
/// `scripts/reference/gguf_to_hf.py` (scripts/test.sh runs it). Its weights are the dequantized
/// GGUF weights, so greedy decoding must give the float64 reference's tokens exactly.
#[tokio::test]
async fn a_hugging_face_directory_serves_the_reference_tokens() {
    let dir = candela::fetch::candela_home().join("test-models/smollm2-135m-instruct-hf");
    assert!(
        dir.join(".complete").exists(),
        "{} is missing: run scripts/test.sh, or python3 scripts/reference/gguf_to_hf.py GGUF {}",
        dir.display(),
        dir.display()
    );
    let mut opts = options(256 << 20);
    opts.sources = vec![dir.display().to_string()];
    let server = start(opts);
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/smollm2_greedy.json")).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let n = case["generated_token_ids"].as_array().unwrap().len();
        let (status, body) = common::post(
            &server.base,
            "/v1/completions",
            json!({"model": "smollm2-135m-instruct-hf", "prompt": case["prompt_token_ids"], "max_tokens": n, "temperature": 0}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let text = body["choices"][0]["text"].as_str().unwrap();
        let expected = case["generated_text"]
            .as_str()
            .unwrap()
            .replace("<|im_end|>", "");
        assert_eq!(text, expected, "{}", case["name"]);
    }
    // The chat template from tokenizer_config.json renders the same prompt as the GGUF's.
    let (status, body) = common::post(
        &server.base,
        "/v1/chat/completions",
        json!({"model": "smollm2-135m-instruct-hf", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 12}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 37);
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
}

/// `candela bench --offline` drives an engine in-process, with no server.
#[tokio::test]
async fn offline_bench_drives_the_engine_in_process() {
    let s = common::run_bench(&[
        "--offline",
        "--model",
        "smollm2-135m-instruct",
        "--kv-cache-memory",
        "0.25",
        "--random-input-len",
        "24",
        "--random-output-len",
        "6",
        "--num-prompts",
        "4",
        "--ignore-eos",
    ])
    .await;
    assert_eq!(s["backend"], "candela-offline");
    assert_eq!(s["completed"], 4);
    assert_eq!(s["total_output_tokens"], 24);
    assert_eq!(s["total_input_tokens"], 4 * 24);
}

/// Offline, prompts are made with the loaded model's own tokenizer: a dummy config needs no
/// --tokenizer.
#[tokio::test]
async fn offline_bench_uses_the_models_own_tokenizer() {
    let dir = common::temp_dir("offline-dummy");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 500, "max_position_embeddings": 512, "rms_norm_eps": 1e-5}"#,
    )
    .unwrap();
    let s = common::run_bench(&[
        "--offline",
        "--load-format",
        "dummy",
        "--model",
        config.to_str().unwrap(),
        "--kv-cache-memory",
        "0.05",
        "--input-len",
        "40",
        "--output-len",
        "5",
        "--num-prompts",
        "3",
        "--ignore-eos",
    ])
    .await;
    assert_eq!(s["completed"], 3);
    assert_eq!(s["total_input_tokens"], 3 * 40);
    assert_eq!(s["total_output_tokens"], 3 * 5);
    std::fs::remove_dir_all(&dir).unwrap();
}
