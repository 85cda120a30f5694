//! Helpers for the platform tests: servers with the platform configured, plain HTTP calls that
//! keep the status and headers, and the real `candela` CLI run on a server's data directory.

use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{TestServer, CHAT};

pub const ADMIN: &str = "admin-secret-for-tests";

/// Tokens required (anonymous denied), an admin token, a 2-second rate-limit window, and the
/// start-up speed calibration on.
pub fn gated() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut opts = super::options(256 << 20);
        opts.calibrate = true;
        let mut config = super::platform_config();
        config.allow_anonymous = false;
        config.admin_token = Some(ADMIN.into());
        config.window = Duration::from_secs(2);
        super::start_with(opts, config)
    })
}

/// Anonymous calls allowed, at most 3 per minute per address.
pub fn open() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let mut config = super::platform_config();
        config.anonymous_limits.rpm = Some(3);
        super::start_with(super::options(128 << 20), config)
    })
}

pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: Value,
}

pub async fn call(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let client = super::client();
    let url = format!("{base}{path}");
    let mut req = match method {
        "GET" => client.get(url),
        "DELETE" => client.delete(url),
        _ => client.post(url),
    };
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Reply {
        status,
        headers,
        body,
    }
}

pub fn chat_body(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
}

/// Runs the candela binary on a server's data directory.
pub fn cli(server: &TestServer, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candela"))
        .args(args)
        .env("CANDELA_HOME", &server.data_dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `candela token create`, returning (id, secret): the secret is alone on the last line.
pub fn create_token(server: &TestServer, project: &str, ttl: &str) -> (String, String) {
    let (ok, stdout, stderr) = cli(
        server,
        &[
            "token",
            "create",
            "--project",
            project,
            "--ttl",
            ttl,
            "--name",
            "test",
        ],
    );
    assert!(ok, "{stderr}");
    let secret = stdout.lines().last().unwrap().trim().to_string();
    let (ok, list, _) = cli(server, &["token", "list", "--project", project]);
    assert!(ok);
    let id = list
        .lines()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .find(|id| secret.contains(id.as_str()))
        .expect("token list shows the new token's id");
    (id, secret)
}

/// Polls until `$check` (an expression that may `.await`) holds, for at most `$limit` (changes
/// made by the CLI reach the server within a second); evaluates to the time it took.
#[allow(unused_macros)]
macro_rules! within {
    ($limit:expr, $check:expr) => {{
        let started = Instant::now();
        loop {
            if $check {
                break started.elapsed();
            }
            assert!(started.elapsed() < $limit, "not within {:?}", $limit);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }};
}

/// A small chat call to server `s` with `token` (or none).
pub async fn chat_as(s: &TestServer, token: Option<&str>) -> Reply {
    call(
        &s.base,
        "POST",
        "/v1/chat/completions",
        token,
        Some(chat_body(CHAT)),
    )
    .await
}

/// Waits until the server accepts a token just made with the CLI (within a second).
pub async fn accepted(s: &TestServer, token: &str) -> Duration {
    within!(Duration::from_secs(1), {
        call(&s.base, "GET", "/v1/models", Some(token), None)
            .await
            .status
            == 200
    })
}
