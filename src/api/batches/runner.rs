//! Runs one batch in the background: validates its input file, sends its requests through the
//! model endpoints in-process (no HTTP, no rate limits, metered as the project's usage) in the
//! engine's batch lane, saves its progress every second, and writes its output and error files.
//!
//! Status changes are compare-and-sets on the stored status, so that a cancel (which moves a
//! `validating` or `in_progress` batch to `cancelling`) and the runner never overwrite each
//! other: the runner learns of a cancel when its next save fails.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request};
use axum::Router;
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::super::files::{blocking, keep_file, lookup, server_error};
use super::super::{ApiError, AppState};
use crate::platform::batches::BatchRecord;
use crate::platform::files::{files_dir, sweep_partial, NewFile, BATCH_OUTPUT};
use crate::platform::ratelimit::Class;
use crate::platform::store::now;
use crate::platform::usage::Meter;
use crate::platform::{Caller, Platform, ANONYMOUS_PROJECT};
use crate::scheduler::Priority;

/// Requests of one batch in flight at once: enough for the engine to batch them.
const CONCURRENCY: usize = 64;
/// Most requests in one batch, and most validation errors reported, as OpenAI's.
const MAX_REQUESTS: usize = 50_000;
const MAX_ERRORS: usize = 100;

/// Tokens a batch used, summed over its answers.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    input: u64,
    output: u64,
    cached: u64,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input + self.output,
        })
    }

    /// Adds an answer's `usage`, in chat's names or the Responses API's.
    fn add(&mut self, body: &Value) {
        let usage = &body["usage"];
        let count = |a: &str, b: &str| usage[a].as_u64().or(usage[b].as_u64()).unwrap_or(0);
        self.input += count("prompt_tokens", "input_tokens");
        self.output += count("completion_tokens", "output_tokens");
        let cached = |details: &str| usage[details]["cached_tokens"].as_u64();
        self.cached += cached("prompt_tokens_details")
            .or(cached("input_tokens_details"))
            .unwrap_or(0);
    }
}

/// One request of the input file.
#[derive(Debug)]
struct Line {
    custom_id: String,
    body: Value,
}

/// A validation error, as the batch's `errors` list holds them.
fn error(code: &str, message: String, param: Option<&str>, line: Option<usize>) -> Value {
    json!({"code": code, "message": message, "param": param, "line": line})
}

/// The requests of an input file, or why the batch fails: every line a JSON object with a
/// unique `custom_id`, `method` POST, `url` the batch's endpoint and a `body` that names a
/// `model` and does not stream. Blank lines are skipped; lines count from 1.
fn parse_lines(text: &str, endpoint: &str) -> Result<Vec<Line>, Vec<Value>> {
    let (mut lines, mut errors) = (Vec::new(), Vec::new());
    let mut seen = HashSet::new();
    for (i, raw) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let n = i + 1;
        if lines.len() + errors.len() >= MAX_REQUESTS {
            errors.push(error(
                "too_many_requests",
                format!("A batch holds at most {MAX_REQUESTS} requests."),
                None,
                Some(n),
            ));
            break;
        }
        let fail =
            |code: &str, message: String, param: Option<&str>| error(code, message, param, Some(n));
        let value: Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => {
                errors.push(fail(
                    "invalid_json_line",
                    format!("Line {n} is not valid JSON: {e}."),
                    None,
                ));
                continue;
            }
        };
        let problem = match (
            &value["custom_id"],
            &value["method"],
            &value["url"],
            &value["body"],
        ) {
            _ if !value.is_object() => Some(fail(
                "invalid_request",
                format!("Line {n} is not a JSON object."),
                None,
            )),
            (Value::String(id), ..) if !seen.insert(id.clone()) => Some(fail(
                "duplicate_custom_id",
                format!("Line {n} repeats the custom_id '{id}'; each request needs its own."),
                Some("custom_id"),
            )),
            (Value::String(_), ..) => None,
            _ => Some(fail(
                "missing_required_parameter",
                format!("Line {n} has no string 'custom_id'."),
                Some("custom_id"),
            )),
        }
        .or_else(|| match &value["method"] {
            Value::String(m) if m == "POST" => None,
            other => Some(fail(
                "invalid_method",
                format!("Line {n}: 'method' must be \"POST\", not {other}."),
                Some("method"),
            )),
        })
        .or_else(|| match &value["url"] {
            Value::String(u) if u == endpoint => None,
            other => Some(fail(
                "invalid_url",
                format!("Line {n}: 'url' is {other}, but this batch's endpoint is '{endpoint}'."),
                Some("url"),
            )),
        })
        .or_else(|| match &value["body"] {
            Value::Object(b) if b.get("stream").and_then(Value::as_bool) == Some(true) => {
                Some(fail(
                    "invalid_request",
                    format!("Line {n}: a batch's requests cannot stream ('body.stream')."),
                    Some("body.stream"),
                ))
            }
            Value::Object(b) if b.get("model").is_some_and(Value::is_string) => None,
            Value::Object(_) => Some(fail(
                "missing_required_parameter",
                format!("Line {n}: 'body' names no 'model'."),
                Some("body.model"),
            )),
            _ => Some(fail(
                "missing_required_parameter",
                format!("Line {n} has no object 'body'."),
                Some("body"),
            )),
        });
        match problem {
            Some(e) => errors.push(e),
            None => lines.push(Line {
                custom_id: value["custom_id"].as_str().unwrap_or_default().to_string(),
                body: value["body"].clone(),
            }),
        }
    }
    if lines.is_empty() && errors.is_empty() {
        errors.push(error(
            "empty_file",
            "The input file holds no requests.".into(),
            None,
            None,
        ));
    }
    errors.truncate(MAX_ERRORS);
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors)
    }
}

/// One request's answer.
struct Outcome {
    custom_id: String,
    status: u16,
    body: Value,
}

/// A line of the output or error file.
fn result_line(custom_id: &str, response: Value, error: Value) -> String {
    let id = format!("batch_req_{}", uuid::Uuid::new_v4().simple());
    json!({"id": id, "custom_id": custom_id, "response": response, "error": error}).to_string()
}

/// Sends one request through the model endpoints, as the batch's owner, in the batch lane.
async fn run_line(
    app: Router,
    caller: Caller,
    platform: Arc<Platform>,
    endpoint: String,
    line: Line,
) -> Outcome {
    let class = if endpoint == "/v1/embeddings" {
        Class::Embeddings
    } else {
        Class::Requests
    };
    let meter = Arc::new(Meter::for_batch(
        platform,
        caller.tag(),
        "/v1/batches",
        class,
    ));
    let mut req = Request::new(Body::from(line.body.to_string()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = endpoint.parse().unwrap_or_default();
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    req.extensions_mut().insert(caller);
    req.extensions_mut().insert(meter.clone());
    req.extensions_mut().insert(Priority::Batch);
    let resp = match app.oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    };
    let status = resp.status().as_u16();
    meter.set_status(status);
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    meter.finish();
    Outcome {
        custom_id: line.custom_id,
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

/// What the requests so far gave. The answers go to the output and error files as they come
/// (each created at its first line), so a batch's memory does not grow with its answers.
struct Results {
    data_dir: std::path::PathBuf,
    output: Option<NewFile>,
    errors: Option<NewFile>,
    /// The first write that failed: the batch ends in an error instead of with a file that
    /// lacks lines.
    write_error: Option<String>,
    done: HashSet<String>,
    completed: usize,
    failed: usize,
    usage: Usage,
}

impl Results {
    fn new(data_dir: &std::path::Path) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            output: None,
            errors: None,
            write_error: None,
            done: HashSet::new(),
            completed: 0,
            failed: 0,
            usage: Usage::default(),
        }
    }

    /// Appends a line to the output file (`ok`) or the error file.
    fn write(&mut self, ok: bool, line: &str) {
        let file = if ok {
            &mut self.output
        } else {
            &mut self.errors
        };
        let written = match file {
            Some(f) => f.write(line.as_bytes()).and_then(|()| f.write(b"\n")),
            None => NewFile::create(&self.data_dir).and_then(|mut f| {
                f.write(line.as_bytes())?;
                f.write(b"\n")?;
                *file = Some(f);
                Ok(())
            }),
        };
        if let Err(e) = written {
            self.write_error.get_or_insert_with(|| e.to_string());
        }
    }

    fn add(&mut self, o: Outcome) {
        let ok = (200..300).contains(&o.status);
        if ok {
            self.usage.add(&o.body);
        }
        let request_id = format!("req_{}", uuid::Uuid::new_v4().simple());
        let response = json!({"status_code": o.status, "request_id": request_id, "body": o.body});
        let line = result_line(&o.custom_id, response, Value::Null);
        self.write(ok, &line);
        if ok {
            self.completed += 1;
        } else {
            self.failed += 1;
        }
        self.done.insert(o.custom_id);
    }
}

/// How the requests ended.
enum End {
    Completed,
    Cancelled,
    Expired,
    /// The server is shutting down: the batch stays as it is stored and runs again at the next
    /// start.
    Stopped,
}

/// The timestamp a status sets.
fn stamp(status: &str) -> Option<&'static str> {
    Some(match status {
        "in_progress" => "in_progress_at",
        "finalizing" => "finalizing_at",
        "completed" => "completed_at",
        "failed" => "failed_at",
        "expired" => "expired_at",
        "cancelled" => "cancelled_at",
        _ => return None,
    })
}

struct Runner {
    state: Arc<AppState>,
    project: String,
    caller: Caller,
    object: Value,
    /// The status stored now: what the next save expects to find.
    stored: String,
}

pub fn spawn(state: Arc<AppState>, record: BatchRecord) {
    let caller = match (&record.token_id, record.project.as_str()) {
        (_, ANONYMOUS_PROJECT) => Caller::Anonymous(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        (token_id, project) => Caller::Project {
            project: project.to_string(),
            token_id: token_id.clone().unwrap_or_default(),
        },
    };
    let runner = Runner {
        state,
        project: record.project.clone(),
        caller,
        stored: record.status().to_string(),
        object: record.object,
    };
    tokio::spawn(async move {
        let mut runner = runner;
        let id = runner.id();
        if let Err(e) = runner.run().await {
            tracing::error!(batch = %id, error = %e.message, "batch failed");
            runner.fail(&e).await;
        }
    });
}

/// Runs again the batches that were unfinished when the server last stopped (from their start:
/// answers in flight then were not kept), and ends those it was cancelling. Only one server of
/// a data directory does: the one holding its batch lock, for as long as it runs.
pub async fn resume(state: Arc<AppState>) {
    // A second back: file times are coarser than the clock.
    let started = std::time::SystemTime::now() - Duration::from_secs(1);
    let path = state.platform.config.data_dir.join("batches.lock");
    // Up to 10 s for a server stopping on the same directory to let go.
    let lock = match take_lock(&path, 40).await {
        Ok(lock) => lock,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "not resuming unfinished batches: another server on this data directory holds them");
            return;
        }
    };
    let _ = state.batch_lock.set(lock);
    let dir = state.platform.config.data_dir.clone();
    match tokio::task::spawn_blocking(move || sweep_partial(&dir, started)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(files = n, "removed partial files left by an earlier run"),
        Ok(Err(e)) => tracing::warn!(error = %e, "removing partial files"),
        Err(e) => tracing::warn!(error = %e, "removing partial files"),
    }
    let unfinished = match blocking(&state, |s| s.unfinished_batches()).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e.message, "listing unfinished batches");
            return;
        }
    };
    for mut record in unfinished {
        let status = record.status().to_string();
        if status == "cancelling" {
            record.object["status"] = json!("cancelled");
            record.object["cancelled_at"] = json!(now());
        } else {
            for field in ["in_progress_at", "finalizing_at"] {
                record.object[field] = Value::Null;
            }
            record.object["status"] = json!("validating");
            record.object["request_counts"] = json!({"total": 0, "completed": 0, "failed": 0});
            record.object["usage"] = Usage::default().json();
        }
        let object = record.object.clone();
        match blocking(&state, move |s| s.update_batch(&status, &object)).await {
            Ok(true) if record.status() == "validating" => {
                tracing::info!(batch = %record.id(), "batch resumed");
                spawn(state.clone(), record);
            }
            Ok(_) => {}
            Err(e) => tracing::error!(batch = %record.id(), error = %e.message, "resuming a batch"),
        }
    }
}

/// Locks `path` (an advisory lock, let go when the file closes), trying again every 250 ms up
/// to `retries` times while another holds it.
async fn take_lock(path: &std::path::Path, retries: u32) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let mut tries = 0;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if tries < retries => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "the lock is held",
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

impl Runner {
    fn id(&self) -> String {
        self.object["id"].as_str().unwrap_or_default().to_string()
    }

    /// Saves the batch if its stored status is still the one this runner last wrote; false when
    /// a cancel came first (the runner then takes on `cancelling`).
    async fn save(&mut self) -> Result<bool, ApiError> {
        let (expected, object) = (self.stored.clone(), self.object.clone());
        if blocking(&self.state, move |s| s.update_batch(&expected, &object)).await? {
            self.stored = self.object["status"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            return Ok(true);
        }
        let (project, id) = (self.project.clone(), self.id());
        let current = blocking(&self.state, move |s| s.batch(&project, &id)).await?;
        match current {
            Some(c) if c.status() == "cancelling" => {
                self.stored = "cancelling".into();
                self.object["status"] = json!("cancelling");
                self.object["cancelling_at"] = c.object["cancelling_at"].clone();
                Ok(false)
            }
            _ => Err(ApiError::invalid(
                None,
                "the batch was changed by another writer",
            )),
        }
    }

    /// Moves to `status` (stamping its time); false when a cancel came first.
    async fn move_to(&mut self, status: &str) -> Result<bool, ApiError> {
        let previous = self.object.clone();
        self.object["status"] = json!(status);
        if let Some(field) = stamp(status) {
            self.object[field] = json!(now());
        }
        let saved = self.save().await?;
        if !saved {
            // Keep what the cancel wrote, not this runner's move.
            let cancelling_at = self.object["cancelling_at"].clone();
            self.object = previous;
            self.object["status"] = json!("cancelling");
            self.object["cancelling_at"] = cancelling_at;
        }
        Ok(saved)
    }

    /// The input file's requests, or the errors that fail the batch.
    async fn read_lines(&self) -> Result<Result<Vec<Line>, Vec<Value>>, ApiError> {
        let input = self.object["input_file_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let endpoint = self.object["endpoint"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let Ok(file) = lookup(&self.state, &self.project, &input).await else {
            let message = format!("The input file '{input}' no longer exists.");
            return Ok(Err(vec![error(
                "file_not_found",
                message,
                Some("input_file_id"),
                None,
            )]));
        };
        let path = files_dir(&self.state.platform.config.data_dir).join(&file.id);
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .map_err(|e| super::super::files::server_error("read a batch's input", e))?
            .map_err(|e| super::super::files::server_error("read a batch's input", e))?;
        Ok(match String::from_utf8(bytes) {
            Ok(text) => parse_lines(&text, &endpoint),
            Err(_) => Err(vec![error(
                "invalid_file",
                "The input file is not UTF-8 text (JSONL).".into(),
                Some("input_file_id"),
                None,
            )]),
        })
    }

    /// Ends the batch as failed after an error of the server's own (a result file it could not
    /// write, say): left as it is stored, it would run again from its start at the next start.
    async fn fail(&mut self, e: &ApiError) {
        let error =
            json!({"code": "server_error", "message": e.message, "param": null, "line": null});
        self.object["errors"] = json!({"object": "list", "data": [error]});
        if let Err(e) = self.move_to("failed").await {
            tracing::error!(batch = %self.id(), error = %e.message, "recording a batch's failure");
        }
    }

    async fn run(&mut self) -> Result<(), ApiError> {
        let lines = match self.read_lines().await? {
            Ok(lines) => lines,
            Err(errors) => {
                tracing::info!(batch = %self.id(), errors = errors.len(), "batch failed validation");
                self.object["errors"] = json!({"object": "list", "data": errors});
                if !self.move_to("failed").await? {
                    let results = Results::new(&self.state.platform.config.data_dir);
                    return self.finish(End::Cancelled, results, &[]).await;
                }
                return Ok(());
            }
        };
        self.object["request_counts"]["total"] = json!(lines.len());
        let ids: Vec<String> = lines.iter().map(|l| l.custom_id.clone()).collect();
        if !self.move_to("in_progress").await? {
            let results = Results::new(&self.state.platform.config.data_dir);
            return self.finish(End::Cancelled, results, &ids).await;
        }
        let (results, end) = self.run_lines(lines).await?;
        self.finish(end, results, &ids).await
    }

    async fn run_lines(&mut self, lines: Vec<Line>) -> Result<(Results, End), ApiError> {
        let app = super::super::model_endpoints().with_state(self.state.clone());
        let endpoint = self.object["endpoint"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let expires_at = self.object["expires_at"].as_i64().unwrap_or(i64::MAX);
        let (caller, platform) = (self.caller.clone(), self.state.platform.clone());
        let mut pending = stream::iter(lines)
            .map(move |line| {
                run_line(
                    app.clone(),
                    caller.clone(),
                    platform.clone(),
                    endpoint.clone(),
                    line,
                )
            })
            .buffer_unordered(CONCURRENCY);
        let mut results = Results::new(&self.state.platform.config.data_dir);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let end = loop {
            tokio::select! {
                next = pending.next() => match next {
                    None => break End::Completed,
                    // Service unavailable: the engines are stopping with the server.
                    Some(o) if o.status == 503 => break End::Stopped,
                    Some(o) => results.add(o),
                },
                _ = tick.tick() => {
                    if now() >= expires_at {
                        break End::Expired;
                    }
                    self.object["request_counts"]["completed"] = json!(results.completed);
                    self.object["request_counts"]["failed"] = json!(results.failed);
                    self.object["usage"] = results.usage.json();
                    if !self.save().await? {
                        break End::Cancelled;
                    }
                }
            }
        };
        Ok((results, end))
    }

    /// Writes the output and error files and the final status. Requests that did not run (a
    /// cancel, the window's end) are listed in the error file.
    async fn finish(
        &mut self,
        end: End,
        mut results: Results,
        ids: &[String],
    ) -> Result<(), ApiError> {
        let mut end = end;
        match end {
            End::Stopped => return Ok(()),
            End::Completed | End::Expired => {
                if !self.move_to("finalizing").await? {
                    end = End::Cancelled;
                }
            }
            End::Cancelled => {}
        }
        let (status, reason) = match end {
            End::Completed => ("completed", None),
            End::Expired => (
                "expired",
                Some((
                    "batch_expired",
                    "The batch expired before this request ran.",
                )),
            ),
            _ => (
                "cancelled",
                Some((
                    "batch_cancelled",
                    "The batch was cancelled before this request ran.",
                )),
            ),
        };
        if let Some((code, message)) = reason {
            let done = std::mem::take(&mut results.done);
            for id in ids.iter().filter(|id| !done.contains(*id)) {
                let error = json!({"code": code, "message": message});
                let line = result_line(id, Value::Null, error);
                results.write(false, &line);
            }
        }
        if let Some(e) = results.write_error.take() {
            return Err(server_error("write the batch's results", e));
        }
        let id = self.id();
        for (file, field, kind) in [
            (results.output.take(), "output_file_id", "output"),
            (results.errors.take(), "error_file_id", "error"),
        ] {
            let Some(file) = file else { continue };
            let name = format!("{id}_{kind}.jsonl");
            let file = keep_file(&self.state, &self.project, name, BATCH_OUTPUT, file).await?;
            self.object[field] = json!(file.id);
        }
        self.object["request_counts"]["completed"] = json!(results.completed);
        self.object["request_counts"]["failed"] = json!(results.failed);
        self.object["usage"] = results.usage.json();
        self.move_to(status).await?;
        tracing::info!(
            batch = %id,
            status,
            completed = results.completed,
            failed = results.failed,
            "batch ended"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_of_the_batch_lock_at_a_time() {
        let dir = std::env::temp_dir().join(format!("candela-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("batches.lock");
        let held = take_lock(&path, 0).await.unwrap();
        let refused = take_lock(&path, 1).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::WouldBlock);
        // Let go while the other waits: it gets the lock.
        let waiting = tokio::spawn(async move { take_lock(&path, 8).await });
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        drop(held);
        assert!(waiting.await.unwrap().is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_input_file_is_checked_line_by_line() {
        let ok = |id: &str| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                                   "body": {"model": "m", "messages": []}})
            .to_string()
        };
        let text = format!("{}\n\n{}\n", ok("a"), ok("b"));
        let lines = parse_lines(&text, "/v1/chat/completions").unwrap();
        assert_eq!(
            lines
                .iter()
                .map(|l| l.custom_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(lines[0].body["model"], "m");

        let bad = [
            "{not json".to_string(),
            ok("a"),
            ok("a"),
            json!({"custom_id": "c", "method": "GET", "url": "/v1/chat/completions", "body": {"model": "m"}}).to_string(),
            json!({"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}).to_string(),
            json!({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "stream": true}}).to_string(),
            json!({"custom_id": "f", "method": "POST", "url": "/v1/chat/completions", "body": {}}).to_string(),
            json!({"method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}).to_string(),
            "[1, 2]".to_string(),
        ]
        .join("\n");
        let errors = parse_lines(&bad, "/v1/chat/completions").unwrap_err();
        let got: Vec<(&str, u64)> = errors
            .iter()
            .map(|e| (e["code"].as_str().unwrap(), e["line"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("invalid_json_line", 1),
                ("duplicate_custom_id", 3),
                ("invalid_method", 4),
                ("invalid_url", 5),
                ("invalid_request", 6),
                ("missing_required_parameter", 7),
                ("missing_required_parameter", 8),
                ("invalid_request", 9),
            ]
        );
        assert_eq!(
            parse_lines("\n \n", "/v1/completions").unwrap_err()[0]["code"],
            "empty_file"
        );
    }

    #[test]
    fn usage_adds_chat_and_responses_answers() {
        let mut u = Usage::default();
        u.add(
            &json!({"usage": {"prompt_tokens": 10, "completion_tokens": 3,
                                "prompt_tokens_details": {"cached_tokens": 8}}}),
        );
        u.add(&json!({"usage": {"input_tokens": 5, "output_tokens": 2}}));
        u.add(&json!({"usage": {"prompt_tokens": 4, "total_tokens": 4}}));
        assert_eq!(
            u,
            Usage {
                input: 19,
                output: 5,
                cached: 8
            }
        );
        assert_eq!(u.json()["total_tokens"], 24);
    }
}
