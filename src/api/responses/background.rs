//! Background responses (`background: true`). The call returns the queued response at once; the
//! generation runs on in the server with no client attached, and its end is stored as any
//! response's is, so `GET /v1/responses/{id}` polls it. Its stream's events are kept in memory
//! while it runs and for a while after, so that `GET /v1/responses/{id}?stream=true` (from
//! `starting_after`) follows it from any point, and `POST /v1/responses/{id}/cancel` stops it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};

/// How long a finished run's events stay to be streamed again.
pub const KEEP_FINISHED: Duration = Duration::from_secs(600);
/// At most this many finished runs' events are kept (the oldest go first).
const KEEP_FINISHED_RUNS: usize = 64;

/// One stream event: its type and its JSON.
pub type StreamEvent = (String, Value);

/// The background runs of this server: those running, and those finished lately.
#[derive(Default)]
pub struct Runs {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Arc<Live>>,
    /// Finished runs still kept, oldest first, with when they finished.
    finished: VecDeque<(String, Instant)>,
}

/// One background run.
pub struct Live {
    project: String,
    log: Mutex<Log>,
    /// Bumped at each event and at the end.
    changed: watch::Sender<()>,
    /// Told to stop (a permit waits if the run is between tokens).
    pub cancel: Arc<Notify>,
}

#[derive(Default)]
struct Log {
    events: Vec<StreamEvent>,
    done: bool,
}

impl Runs {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the run of response `id`.
    pub fn start(&self, id: &str, project: &str) -> Arc<Live> {
        let live = Arc::new(Live {
            project: project.to_string(),
            log: Mutex::default(),
            changed: watch::Sender::new(()),
            cancel: Arc::new(Notify::new()),
        });
        self.inner().live.insert(id.to_string(), live.clone());
        live
    }

    /// The run of response `id`, if `project` started it and its events are still kept.
    pub fn get(&self, project: &str, id: &str) -> Option<Arc<Live>> {
        let mut inner = self.inner();
        inner.expire();
        inner.live.get(id).filter(|l| l.project == project).cloned()
    }

    /// Records the events of the run of response `id` as `events` yields them, until it ends.
    /// `started` is given the response object when the run begins generating.
    pub async fn follow<F: std::future::Future<Output = ()>>(
        self: Arc<Self>,
        id: String,
        live: Arc<Live>,
        mut events: mpsc::Receiver<StreamEvent>,
        started: impl FnOnce(Value) -> F,
    ) {
        let mut started = Some(started);
        while let Some(event) = events.recv().await {
            let begun = (event.0 == "response.in_progress").then(|| event.1["response"].clone());
            live.log().events.push(event);
            live.changed.send_replace(());
            if let Some(object) = begun {
                if let Some(started) = started.take() {
                    started(object).await;
                }
            }
        }
        live.log().done = true;
        live.changed.send_replace(());
        let mut inner = self.inner();
        inner.finished.push_back((id, Instant::now()));
        inner.expire();
    }
}

impl Inner {
    /// Forgets the finished runs past the limits.
    fn expire(&mut self) {
        while let Some((id, at)) = self.finished.front() {
            if self.finished.len() <= KEEP_FINISHED_RUNS && at.elapsed() < KEEP_FINISHED {
                break;
            }
            self.live.remove(id);
            self.finished.pop_front();
        }
    }
}

impl Live {
    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_done(&self) -> bool {
        self.log().done
    }

    /// Waits for the run to end.
    pub async fn finished(&self) {
        let mut changed = self.changed.subscribe();
        while !self.is_done() {
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// The run's events after sequence number `after` (all of them with none): those so far,
    /// then each as it comes, until the run ends or the receiver is dropped.
    pub fn events(self: Arc<Self>, after: Option<u64>) -> mpsc::Receiver<StreamEvent> {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            // Events are numbered from 0 in the order they are logged.
            let mut next = after.map_or(0, |a| a.saturating_add(1) as usize);
            let mut changed = self.changed.subscribe();
            loop {
                let (batch, done) = {
                    let log = self.log();
                    let batch = log.events.get(next..).unwrap_or_default().to_vec();
                    (batch, log.done)
                };
                next += batch.len();
                for event in batch {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                if done || changed.changed().await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(n: u64) -> StreamEvent {
        ("e".into(), json!({"sequence_number": n}))
    }

    async fn drain(mut rx: mpsc::Receiver<StreamEvent>) -> Vec<u64> {
        let mut seen = Vec::new();
        while let Some((_, e)) = rx.recv().await {
            seen.push(e["sequence_number"].as_u64().unwrap());
        }
        seen
    }

    #[tokio::test]
    async fn a_run_is_followed_from_any_point_and_kept_for_its_project_only() {
        let runs = Arc::new(Runs::default());
        let live = runs.start("resp_1", "a");
        assert!(runs.get("b", "resp_1").is_none());
        let (tx, rx) = mpsc::channel(4);
        let follower =
            tokio::spawn(
                runs.clone()
                    .follow("resp_1".into(), live.clone(), rx, |_| async {}),
            );
        tx.send(event(0)).await.unwrap();
        // A reader that joins mid-run gets what it missed after `starting_after`, then the rest.
        let early = live.clone().events(None);
        let late = tokio::spawn(drain(live.clone().events(Some(0))));
        for n in 1..5 {
            tx.send(event(n)).await.unwrap();
        }
        assert!(!live.is_done());
        drop(tx);
        follower.await.unwrap();
        live.finished().await;
        assert_eq!(drain(early).await, [0, 1, 2, 3, 4]);
        assert_eq!(late.await.unwrap(), [1, 2, 3, 4]);
        let kept = runs.get("a", "resp_1").unwrap();
        assert_eq!(drain(kept.events(Some(3))).await, [4]);
    }

    #[tokio::test]
    async fn finished_runs_beyond_the_limit_are_forgotten_oldest_first() {
        let runs = Arc::new(Runs::default());
        for i in 0..=KEEP_FINISHED_RUNS {
            let id = format!("resp_{i}");
            let live = runs.start(&id, "a");
            let (tx, rx) = mpsc::channel(1);
            drop(tx);
            runs.clone().follow(id, live, rx, |_| async {}).await;
        }
        assert!(runs.get("a", "resp_0").is_none());
        assert!(runs.get("a", "resp_1").is_some());
        assert!(runs
            .get("a", &format!("resp_{KEEP_FINISHED_RUNS}"))
            .is_some());
    }
}
