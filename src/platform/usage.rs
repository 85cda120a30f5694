//! Usage metering: every API call gets a [`Meter`] that the handler fills in (model, tokens) and
//! that records one row when the call ends, without its content: in SQLite (written by one
//! background thread, in batches), in the metrics, and against the caller's token budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use super::ratelimit::{Class, Subject, Ticket};
use super::store::{Store, UsageRecord, UsageRow};
use super::Platform;
use crate::serving::ModelInfo;

/// A `from`/`to` that is not a time, or a period that ends before it starts.
#[derive(Debug, thiserror::Error)]
#[error("Invalid value for '{param}': {message}")]
pub struct PeriodError {
    /// `from` or `to`.
    pub param: &'static str,
    message: String,
}

/// The usage period `[from, to)` in Unix milliseconds, from optional bounds: `YYYY-MM-DD` (a
/// whole UTC day; `to` includes it), RFC 3339, or Unix seconds. Defaults: the last 30 days.
pub fn period(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), PeriodError> {
    let now = chrono::Utc::now().timestamp_millis();
    let bound = |text: Option<&str>, end: bool, param, default| match text {
        None => Ok(default),
        Some(t) => parse_bound(t, end).ok_or_else(|| PeriodError {
            param,
            message: format!("`{t}`; expected YYYY-MM-DD, an RFC 3339 time or Unix seconds."),
        }),
    };
    let from = bound(from, false, "from", now - 30 * 86_400_000)?;
    let to = bound(to, true, "to", now + 1000)?;
    if from >= to {
        return Err(PeriodError {
            param: "from",
            message: "it must be before 'to'.".into(),
        });
    }
    Ok((from, to))
}

fn parse_bound(text: &str, end: bool) -> Option<i64> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<i64>() {
        return Some(secs.saturating_mul(1000));
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    let day = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok()?;
    let day = if end { day.succ_opt()? } else { day };
    Some(day.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

/// Sums of a usage table, as `/v1/usage` and `candela usage --json` report them.
pub fn totals(rows: &[UsageRow]) -> serde_json::Value {
    let sum = |f: fn(&UsageRow) -> u64| rows.iter().map(f).sum::<u64>();
    serde_json::json!({
        "requests": sum(|r| r.requests),
        "failed_requests": sum(|r| r.failed_requests),
        "input_tokens": sum(|r| r.input_tokens),
        "output_tokens": sum(|r| r.output_tokens),
        // `+ 0.0`: an empty sum is -0.0.
        "cost": rows.iter().map(|r| r.cost).sum::<f64>() + 0.0,
    })
}

enum Msg {
    Record(UsageRecord),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The writer thread's inbox.
pub struct UsageSink {
    tx: Mutex<mpsc::Sender<Msg>>,
}

impl UsageSink {
    pub fn spawn(store: Arc<Store>) -> Self {
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::Builder::new()
            .name("candela-usage".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut records = Vec::new();
                    let mut flushes = Vec::new();
                    for msg in std::iter::once(first).chain(rx.try_iter().take(1024)) {
                        match msg {
                            Msg::Record(r) => records.push(r),
                            Msg::Flush(done) => flushes.push(done),
                        }
                    }
                    if !records.is_empty() {
                        if let Err(e) = store.insert_usage(&records) {
                            tracing::error!(error = %e, records = records.len(), "usage not recorded");
                        }
                    }
                    for done in flushes {
                        let _ = done.send(());
                    }
                }
            })
            .expect("spawning the usage writer");
        Self { tx: Mutex::new(tx) }
    }

    fn send(&self, msg: Msg) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(msg);
    }

    /// Waits until every record sent so far is in the database.
    pub async fn flush(&self) {
        let (done, wait) = tokio::sync::oneshot::channel();
        self.send(Msg::Flush(done));
        let _ = wait.await;
    }
}

/// Who made a call, as the meter records it.
#[derive(Clone, Debug)]
pub struct CallerTag {
    pub project: String,
    pub token_id: Option<String>,
    pub subject: Subject,
}

#[derive(Default)]
struct State {
    model: Option<String>,
    input_cost: f64,
    output_cost: f64,
    input_tokens: u64,
    output_tokens: u64,
    status: u16,
    failed: bool,
    /// Tokens reserved under the tokens-per-minute limit, settled at the end.
    ticket: Option<Ticket>,
    /// Why the call was refused after admission (the wait before its tokens fit).
    refused_for: Option<std::time::Duration>,
}

/// The status recorded for a call whose client went away before its response was complete
/// (nginx's convention). Its tokens so far are charged: they were computed.
pub const CLIENT_CLOSED: u16 = 499;

/// One call being metered; records itself once, on [`Meter::finish`] or when dropped.
pub struct Meter {
    platform: Arc<Platform>,
    caller: CallerTag,
    endpoint: String,
    class: Class,
    token_limit: Option<u64>,
    at_ms: i64,
    started: Instant,
    state: Mutex<State>,
    done: AtomicBool,
    /// The response is a stream, so the handler's return does not end the call.
    streaming: AtomicBool,
    /// Whether its tokens count against the caller's tokens-per-minute budget (batch work's do
    /// not: it must not crowd out the project's interactive calls).
    limited: bool,
}

impl Meter {
    pub fn new(
        platform: Arc<Platform>,
        caller: CallerTag,
        endpoint: &str,
        class: Class,
        token_limit: Option<u64>,
    ) -> Self {
        Self {
            platform,
            caller,
            endpoint: endpoint.to_string(),
            class,
            token_limit,
            at_ms: chrono::Utc::now().timestamp_millis(),
            started: Instant::now(),
            // Until the handler returns (the middleware then sets the real status).
            state: Mutex::new(State {
                status: CLIENT_CLOSED,
                ..State::default()
            }),
            done: AtomicBool::new(false),
            streaming: AtomicBool::new(false),
            limited: true,
        }
    }

    /// A meter for one request of a batch: recorded as usage, outside the rate limits.
    pub fn for_batch(
        platform: Arc<Platform>,
        caller: CallerTag,
        endpoint: &str,
        class: Class,
    ) -> Self {
        let mut meter = Self::new(platform, caller, endpoint, class, None);
        meter.limited = false;
        meter
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model that serves the call (after virtual-model resolution), with its prices.
    pub fn set_model(&self, info: &ModelInfo) {
        let mut s = self.state();
        s.model = Some(info.id.clone());
        s.input_cost = info.input_cost.unwrap_or(0.0);
        s.output_cost = info.output_cost.unwrap_or(0.0);
    }

    pub fn set_tokens(&self, input: u64, output: u64) {
        let mut s = self.state();
        s.input_tokens = input;
        s.output_tokens = output;
    }

    /// Reserves a call's tokens (prompt + max_tokens) under its tokens-per-minute limit, if it
    /// has one; `Err` holds how long until they fit (`Duration::MAX`: never).
    pub fn reserve_tokens(&self, tokens: u64) -> Result<(), std::time::Duration> {
        let Some(limit) = self.token_limit else {
            return Ok(());
        };
        let reserved =
            self.platform
                .limiter
                .reserve(&self.caller.subject, self.class, tokens, limit);
        let mut s = self.state();
        match reserved {
            Ok(ticket) => {
                s.ticket = Some(ticket);
                Ok(())
            }
            Err(wait) => {
                s.refused_for = Some(wait);
                Err(wait)
            }
        }
    }

    /// The wait that [`Meter::reserve_tokens`] reported, for the `retry-after` header.
    pub fn refused_for(&self) -> Option<std::time::Duration> {
        self.state().refused_for
    }

    pub fn token_limit(&self) -> Option<u64> {
        self.token_limit
    }

    /// The response is a stream: a drop before [`Meter::finish`] means the client left.
    pub fn stream_started(&self) {
        self.streaming.store(true, Ordering::Release);
    }

    /// The response's status (set by the middleware when the handler returns).
    pub fn set_status(&self, status: u16) {
        self.state().status = status;
    }

    /// The call failed after its response began (a stream that ended in an error).
    pub fn fail(&self, status: u16) {
        let mut s = self.state();
        s.status = status;
        s.failed = true;
    }

    /// The model that served the call, once resolved.
    pub fn model(&self) -> Option<String> {
        self.state().model.clone()
    }

    pub fn project(&self) -> &str {
        &self.caller.project
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records the call: the usage row, the metrics, the token budget. Idempotent.
    pub fn finish(&self) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let s = self.state();
        let ok = !s.failed && (s.status < 400 || s.status == CLIENT_CLOSED);
        let model = s.model.clone().unwrap_or_else(|| "-".into());
        let latency = self.started.elapsed();
        let p = &self.platform;
        p.metrics
            .record_request(&model, &self.endpoint, s.status, latency.as_secs_f64());
        let used = if ok {
            p.metrics
                .record_tokens(&model, s.input_tokens, s.output_tokens);
            s.input_tokens + s.output_tokens
        } else {
            0
        };
        match s.ticket {
            _ if !self.limited => {}
            Some(ticket) => p
                .limiter
                .settle(&self.caller.subject, self.class, ticket, used),
            None => p.limiter.add_tokens(&self.caller.subject, self.class, used),
        }
        let cost = if ok {
            (s.input_tokens as f64 * s.input_cost + s.output_tokens as f64 * s.output_cost) / 1e6
        } else {
            0.0
        };
        p.usage.send(Msg::Record(UsageRecord {
            at_ms: self.at_ms,
            project: self.caller.project.clone(),
            token_id: self.caller.token_id.clone(),
            model,
            endpoint: self.endpoint.clone(),
            input_tokens: s.input_tokens,
            output_tokens: s.output_tokens,
            status: s.status,
            ok,
            latency_ms: latency.as_millis() as u64,
            cost,
        }));
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        if !self.done.load(Ordering::Acquire) && self.streaming.load(Ordering::Acquire) {
            self.state().status = CLIENT_CLOSED;
        }
        self.finish();
    }
}

/// Times one generation's tokens for the TTFT and inter-token-latency metrics.
#[derive(Default)]
pub struct TokenClock {
    last: Option<Instant>,
}

impl TokenClock {
    /// A token arrived.
    pub fn tick(&mut self, meter: &Meter) {
        let now = Instant::now();
        let mut s = meter.state();
        s.output_tokens += 1;
        let model = s.model.as_deref().unwrap_or("-");
        let metrics = &meter.platform.metrics;
        match self.last {
            None => metrics.observe_ttft(model, (now - meter.started).as_secs_f64()),
            Some(last) => metrics.observe_itl(model, (now - last).as_secs_f64()),
        }
        self.last = Some(now);
    }
}
