//! A real candela server for integration tests: the default models, the real engine and router,
//! bound on 127.0.0.1:0 and driven over HTTP.

#![allow(dead_code)]

use std::sync::OnceLock;

#[macro_use]
pub mod platform;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candela::platform::{DefaultLimits, Platform, PlatformConfig};
use candela::serving::{load_registry, ServeOptions, Served};
use candle_core::Device;
use futures::StreamExt;
use serde_json::Value;

pub const CHAT: &str = "smollm2-135m-instruct";
pub const EMBED: &str = "all-minilm-l6-v2";

pub struct TestServer {
    pub base: String,
    /// The served models, for reading engine statistics.
    pub models: Vec<Served>,
    pub platform: Arc<Platform>,
    /// The data directory (database) of this server: for running `candela token ...` on it.
    pub data_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub fn chat_stats(&self) -> &candela::engine::EngineStats {
        match self.models.iter().find(|m| m.info().id == CHAT) {
            Some(Served::Chat(c)) => &c.engine.stats,
            _ => panic!("chat model not served"),
        }
    }

    /// Triggers the graceful shutdown of this server.
    pub fn shut_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn options(kv_cache_bytes: u64) -> ServeOptions {
    ServeOptions {
        sources: Vec::new(),
        device: Device::Cpu,
        home: candela::fetch::candela_home(),
        kv_cache_bytes: Some(kv_cache_bytes),
        block_size: 16,
        max_num_seqs: 64,
        max_num_batched_tokens: 512,
        max_batch_prefill_tokens: 512,
        catalog: None,
        calibrate: false,
        dummy_weights: false,
        dtype: None,
        kv_cache_dtype: None,
        precise_prompts: true,
    }
}

/// A fresh data directory for one server's database.
/// A fresh directory under cargo's scratch space for integration tests (`target/tmp`), so that
/// test runs leave nothing in the system's temporary directory.
pub fn temp_dir(label: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("candela-test-{label}-{}", uuid_like()))
}

/// Platform settings for tests: a fresh database, no rate limits unless a test sets them.
pub fn platform_config() -> PlatformConfig {
    let unlimited = DefaultLimits {
        rpm: None,
        embeddings_rpm: None,
        tpm: None,
    };
    PlatformConfig {
        anonymous_limits: unlimited,
        project_limits: unlimited,
        ..PlatformConfig::new(temp_dir("data"))
    }
}

pub fn start(opts: ServeOptions) -> TestServer {
    start_with(opts, platform_config())
}

/// Starts a server on its own thread and runtime (so that it outlives any one test's runtime).
pub fn start_with(opts: ServeOptions, config: PlatformConfig) -> TestServer {
    let registry = load_registry(&opts).expect("default models load (run `candela fetch` first)");
    let models = registry.models.clone();
    let data_dir = config.data_dir.clone();
    let platform = Platform::open(config).expect("the database opens");
    let server_platform = platform.clone();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            candela::serve(listener, registry, server_platform, async {
                let _ = stop.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = addr_rx.recv().unwrap();
    TestServer {
        base: format!("http://{addr}"),
        models,
        platform,
        data_dir,
        shutdown: Some(shutdown),
    }
}

/// The server most tests share: default models, 512 MiB of KV cache.
pub fn shared() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| start(options(512 << 20)))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub async fn post(base: &str, path: &str, body: Value) -> (u16, Value) {
    let resp = client()
        .post(format!("{base}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v = resp.json::<Value>().await.unwrap_or(Value::Null);
    (status, v)
}

pub async fn post_raw(base: &str, path: &str, body: &'static str) -> (u16, Value) {
    let resp = client()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json::<Value>().await.unwrap_or(Value::Null))
}

/// A chat request body.
pub fn chat(content: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({
        "model": CHAT,
        "messages": [{"role": "user", "content": content}],
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// Runs a streaming request and returns its server-sent events as (`event:` name, `data:`).
pub async fn sse(base: &str, path: &str, body: Value) -> Vec<(Option<String>, String)> {
    read_sse(client().post(format!("{base}{path}")).json(&body)).await
}

/// The events of a `GET` that streams (as `sse`).
pub async fn sse_get(base: &str, path: &str) -> Vec<(Option<String>, String)> {
    read_sse(client().get(format!("{base}{path}"))).await
}

async fn read_sse(request: reqwest::RequestBuilder) -> Vec<(Option<String>, String)> {
    let resp = request.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut bytes = resp.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    while let Some(chunk) = bytes.next().await {
        let Ok(chunk) = chunk else { break };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let name = event.lines().find_map(|l| l.strip_prefix("event: "));
            if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                events.push((name.map(str::to_string), data.to_string()));
            }
        }
    }
    events
}

/// Runs a streaming request and returns every `data:` payload (without the final `[DONE]`),
/// and whether `[DONE]` came.
pub async fn stream(base: &str, path: &str, body: Value) -> (Vec<Value>, bool) {
    let mut done = false;
    let mut events = Vec::new();
    for (_, data) in sse(base, path, body).await {
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(&data).unwrap());
        }
    }
    (events, done)
}

/// Concatenated content of a chat stream.
pub fn stream_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect()
}

#[derive(clap::Parser)]
struct BenchCli {
    #[command(flatten)]
    args: candela::bench::BenchArgs,
}

/// Runs `candela bench` with these flags and returns its saved JSON.
pub async fn run_bench(flags: &[&str]) -> Value {
    run_bench_until(flags, std::future::pending()).await
}

/// [`run_bench`], interrupted when `stop` resolves.
pub async fn run_bench_until(flags: &[&str], stop: impl std::future::Future<Output = ()>) -> Value {
    use clap::Parser;
    let out = temp_dir("bench").with_extension("json");
    let mut argv = vec!["bench", "--result-filename", out.to_str().unwrap()];
    argv.extend_from_slice(flags);
    let cli = BenchCli::try_parse_from(argv).unwrap();
    candela::bench::run_until(cli.args, candela::fetch::candela_home(), stop)
        .await
        .unwrap();
    let saved: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    saved
}

fn uuid_like() -> String {
    format!(
        "{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}
