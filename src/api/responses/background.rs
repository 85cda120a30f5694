//! Background responses (`background: true`). The call returns the queued response at once; the
//! generation runs on in the server with no client attached, and its end is stored as any
//! response's is, so `GET /v1/responses/{id}` polls it. Its stream's events are kept in memory
//! while it runs and for a while after, so that `GET /v1/responses/{id}?stream=true` (from
//! `starting_after`) follows it from any point, and `POST /v1/responses/{id}/cancel` stops it.
//!
//! Several servers may share a data directory. Each stored run names the server that runs it
//! (its boot id), and each server holds a lock file (`runs/<boot>.lock`) while it lives, so that
//! the runs of a server that stopped are told from those of one still running, and marked
//! failed (`Runs::sweep`).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::platform::store::{Store, StoreError};

use serde_json::Value;
use tokio::sync::{mpsc, watch, Notify};

/// How long a finished run's events stay to be streamed again.
pub const KEEP_FINISHED: Duration = Duration::from_secs(600);
/// At most this many finished runs' events are kept (the oldest go first).
const KEEP_FINISHED_RUNS: usize = 64;

/// One stream event: its type and its JSON.
pub type StreamEvent = (String, Value);

/// The background runs of this server: those running, and those finished lately.
pub struct Runs {
    inner: Mutex<Inner>,
    /// This server's id in the stored runs.
    pub boot: String,
    /// Where the servers' lock files are (none in tests of this module alone).
    dir: Option<PathBuf>,
    /// This server's lock file, held while it lives.
    _alive: Option<File>,
}

impl Default for Runs {
    fn default() -> Self {
        Self {
            inner: Mutex::default(),
            boot: uuid::Uuid::new_v4().simple().to_string(),
            dir: None,
            _alive: None,
        }
    }
}

/// What a run that a stopped server left ends with.
const STOPPED: &str = "The server that ran this background response stopped before it finished.";

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
    /// The runs of a server on `data_dir`: it takes a lock file there for as long as it lives.
    pub fn open(data_dir: &Path) -> Self {
        let mut runs = Self {
            dir: Some(data_dir.join("runs")),
            ..Self::default()
        };
        match runs.take_lock() {
            Ok(file) => runs._alive = Some(file),
            Err(e) => {
                tracing::warn!(error = %e, "no lock file for background responses: another server on this data directory could take this one's for stopped")
            }
        }
        runs
    }

    /// Locks a file of its own name, made under another name first: a file seen under a
    /// server's name is always locked already while that server lives.
    fn take_lock(&self) -> std::io::Result<File> {
        let dir = self.dir.as_ref().ok_or(std::io::ErrorKind::NotFound)?;
        std::fs::create_dir_all(dir)?;
        let making = dir.join(format!("{}.new", self.boot));
        let file = File::create(&making)?;
        file.try_lock().map_err(|e| match e {
            std::fs::TryLockError::Error(e) => e,
            std::fs::TryLockError::WouldBlock => std::io::ErrorKind::WouldBlock.into(),
        })?;
        std::fs::rename(&making, dir.join(format!("{}.lock", self.boot)))?;
        Ok(file)
    }

    /// Whether the server started as `boot` has stopped: its lock file is gone or free. A free
    /// one is removed.
    fn stopped(&self, boot: &str) -> bool {
        let Some(dir) = &self.dir else { return false };
        let path = dir.join(format!("{boot}.lock"));
        free(&path).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading a server's lock file; taking that server for running");
            false
        })
    }

    /// Marks failed the stored background responses whose server has stopped; how many.
    pub fn sweep(&self, store: &Store) -> Result<usize, StoreError> {
        let mut by_boot: HashMap<String, Vec<String>> = HashMap::new();
        for (id, boot) in store.unfinished_responses()? {
            if boot != self.boot {
                by_boot.entry(boot).or_default().push(id);
            }
        }
        let mut failed = 0;
        for (boot, ids) in by_boot {
            if self.stopped(&boot) {
                failed += store.fail_responses(&ids, STOPPED)?;
            }
        }
        // The lock files of the other servers that stopped go too (and those of servers that
        // stopped while making theirs).
        let files = self.dir.iter().filter_map(|d| std::fs::read_dir(d).ok());
        for path in files.flatten().flatten().map(|e| e.path()) {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default();
            let lock = path.extension().is_some_and(|e| e == "lock" || e == "new");
            if lock && name != self.boot {
                let _ = free(&path);
            }
        }
        Ok(failed)
    }

    /// Waits, up to `limit`, for the runs still going to end (as they do once the engines
    /// stop, storing their end).
    pub async fn wait_all(&self, limit: Duration) {
        let running: Vec<Arc<Live>> = self
            .inner()
            .live
            .values()
            .filter(|l| !l.is_done())
            .cloned()
            .collect();
        let all = futures::future::join_all(running.iter().map(|l| l.finished()));
        let _ = tokio::time::timeout(limit, all).await;
    }

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

/// Whether no server holds the lock file at `path` (gone, or free: then it is removed).
fn free(path: &Path) -> std::io::Result<bool> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => {
            std::fs::remove_file(path)?;
            Ok(true)
        }
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
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

    #[test]
    fn the_runs_of_a_stopped_server_are_failed_and_those_of_a_live_one_kept() {
        use crate::platform::responses::StoredResponse;
        let dir = std::env::temp_dir().join(format!("candela-runs-{}", uuid::Uuid::new_v4()));
        let store = Store::open_dir(&dir).unwrap();
        let (a, b) = (Runs::open(&dir), Runs::open(&dir));
        let queue = |id: &str, runs: &Runs| {
            let r = StoredResponse {
                id: id.into(),
                project: "p".into(),
                created_at: 1,
                response: json!({"id": id, "status": "queued"}),
                input_items: Vec::new(),
                conversation: Vec::new(),
            };
            store.queue_response(&r, &runs.boot).unwrap();
        };
        queue("resp_a", &a);
        queue("resp_b", &b);
        assert_eq!(b.sweep(&store).unwrap(), 0);
        assert_eq!(a.sweep(&store).unwrap(), 0);
        let lock = dir.join("runs").join(format!("{}.lock", a.boot));
        assert!(lock.exists());
        let gone = Runs::open(&dir);
        let gone_lock = dir.join("runs").join(format!("{}.lock", gone.boot));
        drop((a, gone));
        assert_eq!(b.sweep(&store).unwrap(), 1);
        assert!(!lock.exists() && !gone_lock.exists());
        let status =
            |id: &str| store.response("p", id).unwrap().unwrap().response["status"].clone();
        assert_eq!(status("resp_a"), "failed");
        assert_eq!(status("resp_b"), "queued");
        drop((b, store));
        std::fs::remove_dir_all(&dir).unwrap();
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
