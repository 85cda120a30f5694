//! Per-project (and per anonymous client address) rate limits over a sliding window: requests
//! per minute, a separate requests-per-minute for embeddings, and tokens per minute. Request
//! counts are taken at admission. Tokens are reserved when a call knows its size (prompt +
//! max_tokens), so concurrent calls cannot overrun the budget together, and settled to the
//! actual count when it ends.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Who is limited.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    Project(String),
    Anonymous(IpAddr),
}

/// Which request budget a call draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Requests,
    Embeddings,
}

/// The limits that apply to one call; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    pub requests: Option<u64>,
    pub tokens: Option<u64>,
}

/// The outcome of an admission check, with what the `x-ratelimit-*` headers report.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// `None`: admitted. `Some(limit)`: refused by that limit ("requests" or "tokens").
    pub refused_by: Option<&'static str>,
    pub retry_after: Duration,
    pub requests: Option<Budget>,
    pub tokens: Option<Budget>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub limit: u64,
    pub remaining: u64,
    /// Until the budget is whole again.
    pub reset: Duration,
}

#[derive(Default)]
struct Window {
    requests: VecDeque<Instant>,
    /// (when, tokens, ticket) of calls, reserved or finished.
    tokens: VecDeque<(Instant, u64, u64)>,
}

/// A reservation of tokens, settled when the call ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u64);

pub struct RateLimiter {
    window: Duration,
    next_ticket: std::sync::atomic::AtomicU64,
    state: Mutex<HashMap<(Subject, Class), Window>>,
}

impl RateLimiter {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            next_ticket: std::sync::atomic::AtomicU64::new(1),
            state: Mutex::new(HashMap::new()),
        }
    }

    /// Admits a call (counting it) or refuses it.
    pub fn check(&self, subject: &Subject, class: Class, limits: Limits) -> Decision {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.len() > 10_000 {
            // Anonymous clients come and go: forget the idle ones.
            state.retain(|_, w| !w.requests.is_empty() || !w.tokens.is_empty());
        }
        let w = state.entry((subject.clone(), class)).or_default();
        self.slide(w, now);
        let used_tokens: u64 = w.tokens.iter().map(|(_, n, _)| n).sum();
        let until = |t: Instant| (t + self.window).saturating_duration_since(now);
        let mut refused_by = None;
        let mut retry_after = Duration::ZERO;
        if let Some(limit) = limits.requests {
            if w.requests.len() as u64 >= limit {
                refused_by = Some("requests");
                // Enough of the oldest calls must leave the window to make room for one.
                let excess = w.requests.len() + 1 - limit.max(1) as usize;
                retry_after = w
                    .requests
                    .get(excess.saturating_sub(1))
                    .map_or(self.window, |&t| until(t));
            }
        }
        if let Some(limit) = limits.tokens {
            if refused_by.is_none() && used_tokens >= limit {
                refused_by = Some("tokens");
                retry_after = self.room_after(w, now, 1, limit);
            }
        }
        if refused_by.is_none() && limits.requests.is_some() {
            w.requests.push_back(now);
        }
        let requests = limits.requests.map(|limit| Budget {
            limit,
            remaining: limit.saturating_sub(w.requests.len() as u64),
            reset: w.requests.back().map_or(Duration::ZERO, |&t| until(t)),
        });
        let tokens = limits.tokens.map(|limit| Budget {
            limit,
            remaining: limit.saturating_sub(used_tokens),
            reset: w
                .tokens
                .back()
                .map_or(Duration::ZERO, |&(t, _, _)| until(t)),
        });
        Decision {
            refused_by,
            // Clients retry after whole seconds; never tell them zero.
            retry_after: retry_after.max(Duration::from_millis(1)),
            requests,
            tokens,
        }
    }

    /// Counts the tokens of a finished call against its subject's token budget.
    pub fn add_tokens(&self, subject: &Subject, class: Class, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let w = state.entry((subject.clone(), class)).or_default();
        w.tokens.push_back((Instant::now(), tokens, 0));
    }

    /// Reserves `tokens` (a call's prompt + max_tokens) under `limit`, or says how long until
    /// they fit (`Err`, the wait; `Duration::MAX` when they never can).
    pub fn reserve(
        &self,
        subject: &Subject,
        class: Class,
        tokens: u64,
        limit: u64,
    ) -> Result<Ticket, Duration> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let w = state.entry((subject.clone(), class)).or_default();
        self.slide(w, now);
        if tokens > limit {
            return Err(Duration::MAX);
        }
        let used: u64 = w.tokens.iter().map(|(_, n, _)| n).sum();
        if used + tokens > limit {
            return Err(self.room_after(w, now, tokens, limit));
        }
        let ticket = self
            .next_ticket
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        w.tokens.push_back((now, tokens, ticket));
        Ok(Ticket(ticket))
    }

    /// Replaces a reservation by the tokens the call actually used.
    pub fn settle(&self, subject: &Subject, class: Class, ticket: Ticket, actual: u64) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = state.get_mut(&(subject.clone(), class)) {
            if let Some(entry) = w.tokens.iter_mut().find(|e| e.2 == ticket.0) {
                entry.1 = actual;
            }
        }
    }

    /// How long until `need` more tokens fit under `limit`, as the oldest entries leave.
    fn room_after(&self, w: &Window, now: Instant, need: u64, limit: u64) -> Duration {
        let mut used: u64 = w.tokens.iter().map(|(_, n, _)| n).sum();
        for &(t, n, _) in &w.tokens {
            used -= n;
            if used + need <= limit {
                return (t + self.window).saturating_duration_since(now);
            }
        }
        self.window
    }

    fn slide(&self, w: &mut Window, now: Instant) {
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < self.window;
        while w.requests.front().is_some_and(|t| !fresh(t)) {
            w.requests.pop_front();
        }
        while w.tokens.front().is_some_and(|(t, _, _)| !fresh(t)) {
            w.tokens.pop_front();
        }
    }
}

/// OpenAI's duration format for `x-ratelimit-reset-*`: `6m0s`, `1.5s`, `20ms`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let tenths = (ms + 50) / 100;
    if tenths < 600 {
        format!("{}s", tenths as f64 / 10.0)
    } else {
        let secs = tenths / 10;
        format!("{}m{}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> Subject {
        Subject::Project("p".into())
    }

    #[test]
    fn requests_beyond_the_limit_are_refused_until_the_window_slides() {
        let rl = RateLimiter::new(Duration::from_millis(200));
        let limits = Limits {
            requests: Some(2),
            tokens: None,
        };
        assert!(rl
            .check(&project(), Class::Requests, limits)
            .refused_by
            .is_none());
        let d = rl.check(&project(), Class::Requests, limits);
        assert_eq!(d.refused_by, None);
        assert_eq!(d.requests.as_ref().unwrap().remaining, 0);
        let refused = rl.check(&project(), Class::Requests, limits);
        assert_eq!(refused.refused_by, Some("requests"));
        assert!(refused.retry_after <= Duration::from_millis(200));
        // Other classes and subjects have their own budgets.
        assert!(rl
            .check(&project(), Class::Embeddings, limits)
            .refused_by
            .is_none());
        let other = Subject::Anonymous("127.0.0.1".parse().unwrap());
        assert!(rl
            .check(&other, Class::Requests, limits)
            .refused_by
            .is_none());
        std::thread::sleep(Duration::from_millis(220));
        assert!(rl
            .check(&project(), Class::Requests, limits)
            .refused_by
            .is_none());
    }

    #[test]
    fn tokens_count_when_calls_finish() {
        let rl = RateLimiter::new(Duration::from_secs(60));
        let limits = Limits {
            requests: None,
            tokens: Some(100),
        };
        assert!(rl
            .check(&project(), Class::Requests, limits)
            .refused_by
            .is_none());
        rl.add_tokens(&project(), Class::Requests, 60);
        let d = rl.check(&project(), Class::Requests, limits);
        assert_eq!(d.refused_by, None);
        assert_eq!(d.tokens.unwrap().remaining, 40);
        rl.add_tokens(&project(), Class::Requests, 60);
        let d = rl.check(&project(), Class::Requests, limits);
        assert_eq!(d.refused_by, Some("tokens"));
        assert!(d.retry_after > Duration::from_secs(59));
    }

    #[test]
    fn reservations_hold_the_budget_until_settled() {
        let rl = RateLimiter::new(Duration::from_secs(60));
        let p = project();
        let a = rl.reserve(&p, Class::Requests, 60, 100).unwrap();
        // A second call of the same size does not fit beside the first.
        assert!(rl.reserve(&p, Class::Requests, 60, 100).is_err());
        assert_eq!(
            rl.reserve(&p, Class::Requests, 101, 100),
            Err(Duration::MAX)
        );
        // The first used fewer tokens than it reserved: the rest is free again.
        rl.settle(&p, Class::Requests, a, 10);
        assert!(rl.reserve(&p, Class::Requests, 60, 100).is_ok());
        let limits = Limits {
            requests: None,
            tokens: Some(100),
        };
        assert_eq!(
            rl.check(&p, Class::Requests, limits)
                .tokens
                .unwrap()
                .remaining,
            30
        );
    }

    #[test]
    fn unlimited_is_always_admitted() {
        let rl = RateLimiter::new(Duration::from_secs(60));
        for _ in 0..1000 {
            assert!(rl
                .check(&project(), Class::Requests, Limits::default())
                .refused_by
                .is_none());
        }
    }

    #[test]
    fn reset_durations_read_like_openai_s() {
        assert_eq!(format_reset(Duration::from_millis(20)), "20ms");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_millis(59_990)), "1m0s");
    }
}
