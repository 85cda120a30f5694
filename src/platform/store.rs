//! The embedded SQLite database under the data directory: projects with their limits, access
//! tokens (only a hash of each secret), the usage log, stored Responses API responses
//! (`responses.rs`), files, uploads and batches (`files.rs`, `uploads.rs`, `batches.rs`). The CLI and a running server open the same file; WAL mode lets them write
//! while the other reads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection};
use serde::Serialize;

use super::token::{self, TokenSecret};

/// The database file inside the data directory.
pub const DB_FILE: &str = "candela.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A project's limits; `None` means the server's default.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProjectLimits {
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub embeddings_rpm: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Project {
    pub name: String,
    #[serde(flatten)]
    pub limits: ProjectLimits,
    pub created_at: i64,
}

/// A token as listed: never its secret.
#[derive(Clone, Debug, Serialize)]
pub struct TokenRecord {
    pub id: String,
    pub project: String,
    pub name: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
    #[serde(skip)]
    pub hash: [u8; 32],
}

impl TokenRecord {
    pub fn state(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at <= now {
            "expired"
        } else {
            "active"
        }
    }
}

/// One metered request: sizes and outcome, never content.
#[derive(Clone, Debug)]
pub struct UsageRecord {
    /// Unix milliseconds when the request arrived.
    pub at_ms: i64,
    pub project: String,
    pub token_id: Option<String>,
    pub model: String,
    pub endpoint: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub status: u16,
    pub ok: bool,
    pub latency_ms: u64,
    /// Estimated cost in EUR from the catalog prices at the time (0 when failed).
    pub cost: f64,
}

/// Calls and tokens of one project on one model on one (UTC) day. `requests` counts every call,
/// failed ones included; tokens and cost count the successful ones.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct UsageRow {
    pub date: String,
    pub project: String,
    pub model: String,
    pub requests: u64,
    pub failed_requests: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost: f64,
}

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating when needed) the database in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Invalid(format!(
                "creating the data directory {}: {e}",
                dir.display()
            ))
        })?;
        Self::open(&dir.join(DB_FILE))
    }

    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |source| StoreError::Sqlite {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// A number that changes whenever another connection (the CLI, another server) commits.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.with(|c| c.query_row("PRAGMA data_version", [], |r| r.get(0)))
    }

    /// Creates a token for `project` (creating the project with default limits when new) and
    /// returns its record and the secret, which is never stored.
    pub fn create_token(
        &self,
        project: &str,
        name: Option<&str>,
        ttl: Duration,
    ) -> Result<(TokenRecord, TokenSecret), StoreError> {
        check_name("project", project)?;
        if let Some(name) = name {
            if name.len() > 128 || name.chars().any(char::is_control) {
                return Err(StoreError::Invalid(
                    "a token name is at most 128 characters, without control characters".into(),
                ));
            }
        }
        let secret = TokenSecret::generate();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let now = now_ms.div_euclid(1000);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let record = TokenRecord {
            id: secret.id().to_string(),
            project: project.to_string(),
            name: name.map(str::to_owned),
            created_at: now,
            // Rounded up: a token is valid for at least its whole period.
            expires_at: now_ms
                .saturating_add(ttl_ms)
                .saturating_add(999)
                .div_euclid(1000),
            revoked_at: None,
            hash: secret.hash(),
        };
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO projects (name, created_at) VALUES (?1, ?2)",
                params![project, now],
            )?;
            tx.execute(
                "INSERT INTO tokens (id, project, name, hash, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![record.id, record.project, record.name, record.hash.as_slice(), record.created_at, record.expires_at],
            )?;
            tx.commit()
        })?;
        Ok((record, secret))
    }

    pub fn tokens(&self, project: Option<&str>) -> Result<Vec<TokenRecord>, StoreError> {
        self.select_tokens("WHERE ?1 IS NULL OR project = ?1", project)
    }

    pub fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.select_tokens("WHERE id = ?1", Some(id))?.pop())
    }

    fn select_tokens(
        &self,
        filter: &str,
        arg: Option<&str>,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT id, project, name, hash, created_at, expires_at, revoked_at FROM tokens
                 {filter} ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map(params![arg], |r| {
                let hash: Vec<u8> = r.get(3)?;
                Ok(TokenRecord {
                    id: r.get(0)?,
                    project: r.get(1)?,
                    name: r.get(2)?,
                    hash: hash.try_into().unwrap_or([0; 32]),
                    created_at: r.get(4)?,
                    expires_at: r.get(5)?,
                    revoked_at: r.get(6)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Revokes a token by id; `Ok(None)` when no token has that id.
    pub fn revoke(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        let now = now();
        self.with(|c| {
            c.execute(
                "UPDATE tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now],
            )
        })?;
        self.token(id)
    }

    /// Revokes the token whose secret is `presented`; `Ok(None)` when it is not a valid token.
    pub fn revoke_secret(&self, presented: &str) -> Result<Option<TokenRecord>, StoreError> {
        let Some((id, hash)) = token::split(presented) else {
            return Ok(None);
        };
        match self.token(id)? {
            Some(t) if token::hashes_equal(&t.hash, &hash) => self.revoke(&t.id),
            _ => Ok(None),
        }
    }

    /// Sets the given limits of a project (creating it when new); `Some(0)` clears a limit back
    /// to the server default.
    pub fn set_project(&self, name: &str, limits: &ProjectLimits) -> Result<Project, StoreError> {
        check_name("project", name)?;
        let now = now();
        let opt = |v: Option<u64>| v.map(|n| if n == 0 { None } else { Some(n as i64) });
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO projects (name, created_at) VALUES (?1, ?2)",
                params![name, now],
            )?;
            for (column, value) in [
                ("rpm", opt(limits.rpm)),
                ("tpm", opt(limits.tpm)),
                ("embeddings_rpm", opt(limits.embeddings_rpm)),
            ] {
                if let Some(v) = value {
                    tx.execute(
                        &format!("UPDATE projects SET {column} = ?2 WHERE name = ?1"),
                        params![name, v],
                    )?;
                }
            }
            tx.commit()
        })?;
        self.projects()?
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| StoreError::Invalid(format!("project `{name}` vanished")))
    }

    pub fn projects(&self) -> Result<Vec<Project>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT name, rpm, tpm, embeddings_rpm, created_at FROM projects ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(Project {
                    name: r.get(0)?,
                    limits: ProjectLimits {
                        rpm: r.get::<_, Option<i64>>(1)?.map(|v| v as u64),
                        tpm: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                        embeddings_rpm: r.get::<_, Option<i64>>(3)?.map(|v| v as u64),
                    },
                    created_at: r.get(4)?,
                })
            })?;
            rows.collect()
        })
    }

    pub fn insert_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO usage (at_ms, project, token_id, model, endpoint, input_tokens,
                     output_tokens, status, ok, latency_ms, cost)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                )?;
                for r in records {
                    stmt.execute(params![
                        r.at_ms,
                        r.project,
                        r.token_id,
                        r.model,
                        r.endpoint,
                        r.input_tokens as i64,
                        r.output_tokens as i64,
                        r.status,
                        r.ok,
                        r.latency_ms as i64,
                        r.cost
                    ])?;
                }
            }
            tx.commit()
        })
    }

    /// Usage per project, model and UTC day for requests that arrived in `[from_ms, to_ms)`.
    /// Tokens and cost count successful requests only; failed ones are counted apart.
    pub fn usage(
        &self,
        project: Option<&str>,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT date(at_ms / 1000, 'unixepoch') AS day, project, model,
                        COUNT(*), SUM(1 - ok),
                        SUM(CASE WHEN ok THEN input_tokens ELSE 0 END),
                        SUM(CASE WHEN ok THEN output_tokens ELSE 0 END),
                        SUM(CASE WHEN ok THEN cost ELSE 0 END)
                 FROM usage
                 WHERE (?1 IS NULL OR project = ?1) AND at_ms >= ?2 AND at_ms < ?3
                 GROUP BY day, project, model ORDER BY day, project, model",
            )?;
            let rows = stmt.query_map(params![project, from_ms, to_ms], |r| {
                Ok(UsageRow {
                    date: r.get(0)?,
                    project: r.get(1)?,
                    model: r.get(2)?,
                    requests: r.get::<_, i64>(3)? as u64,
                    failed_requests: r.get::<_, i64>(4)? as u64,
                    input_tokens: r.get::<_, i64>(5)? as u64,
                    output_tokens: r.get::<_, i64>(6)? as u64,
                    cost: r.get(7)?,
                })
            })?;
            rows.collect()
        })
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Project names: what a user can type and read in a log line.
fn check_name(what: &str, name: &str) -> Result<(), StoreError> {
    if name == super::ANONYMOUS_PROJECT {
        return Err(StoreError::Invalid(format!(
            "`{name}` is reserved for calls without a token (its limits are `candela serve --anonymous-rpm` and `--anonymous-embeddings-rpm`)"
        )));
    }
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} name `{name}` must be 1 to 64 characters of letters, digits, `-`, `_` or `.`"
        )))
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS projects (
    name TEXT PRIMARY KEY,
    rpm INTEGER,
    tpm INTEGER,
    embeddings_rpm INTEGER,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL REFERENCES projects(name),
    name TEXT,
    hash BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX IF NOT EXISTS tokens_project ON tokens(project);
CREATE TABLE IF NOT EXISTS usage (
    at_ms INTEGER NOT NULL,
    project TEXT NOT NULL,
    token_id TEXT,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    status INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    cost REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_project_time ON usage(project, at_ms);
CREATE INDEX IF NOT EXISTS usage_time ON usage(at_ms);
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_project ON responses(project, created_at);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS files_project ON files(project);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    token_id TEXT,
    status TEXT NOT NULL,
    object TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_project ON batches(project);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    metadata TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS conversation_items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation TEXT NOT NULL,
    id TEXT NOT NULL,
    item TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS conversation_items_of ON conversation_items(conversation, seq);
CREATE UNIQUE INDEX IF NOT EXISTS conversation_items_id ON conversation_items(conversation, id);
CREATE TABLE IF NOT EXISTS chat_completions (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    completion TEXT NOT NULL,
    messages TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chat_completions_project ON chat_completions(project, created_at);
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL,
    mime_type TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    file_id TEXT
);
CREATE INDEX IF NOT EXISTS uploads_pending ON uploads(status, expires_at);
CREATE TABLE IF NOT EXISTS upload_parts (
    id TEXT PRIMARY KEY,
    upload TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS upload_parts_of ON upload_parts(upload);
CREATE TABLE IF NOT EXISTS background_owners (
    id TEXT PRIMARY KEY,
    boot TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS response_cancels (
    id TEXT PRIMARY KEY
);
";

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when dropped (after the store beside it in the tuple).
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn temp_store() -> (Store, TempDir) {
        let dir = std::env::temp_dir().join(format!("candela-store-{}", uuid::Uuid::new_v4()));
        (Store::open_dir(&dir).unwrap(), TempDir(dir))
    }

    #[test]
    fn tokens_are_created_listed_and_revoked_without_storing_the_secret() {
        let (store, dir) = temp_store();
        let (rec, secret) = store
            .create_token("alpha", Some("ci"), Duration::from_secs(60))
            .unwrap();
        let listed = store.tokens(Some("alpha")).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, rec.id);
        assert_eq!(listed[0].state(now()), "active");
        assert!(store.tokens(Some("beta")).unwrap().is_empty());
        let revoked = store.revoke_secret(secret.expose()).unwrap().unwrap();
        assert_eq!(revoked.state(now()), "revoked");
        assert!(store.revoke("nope").unwrap().is_none());
        // Read only once the store is closed: closing a descriptor of an open SQLite file drops
        // the process's locks on it.
        drop(store);
        let bytes = std::fs::read(dir.join(DB_FILE)).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&secret.expose()[17..]));
    }

    #[test]
    fn project_limits_set_and_clear() {
        let (store, _dir) = temp_store();
        let p = store
            .set_project(
                "p1",
                &ProjectLimits {
                    rpm: Some(5),
                    tpm: Some(100),
                    embeddings_rpm: None,
                },
            )
            .unwrap();
        assert_eq!(p.limits.rpm, Some(5));
        let p = store
            .set_project(
                "p1",
                &ProjectLimits {
                    rpm: Some(0),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(p.limits.rpm, None);
        assert_eq!(p.limits.tpm, Some(100));
        assert!(store
            .set_project("bad name", &ProjectLimits::default())
            .is_err());
    }

    #[test]
    fn usage_aggregates_per_day_and_model_and_does_not_charge_failures() {
        let (store, _dir) = temp_store();
        let rec = |ok: bool, input, output, cost| UsageRecord {
            at_ms: 1_700_000_000_000,
            project: "p".into(),
            token_id: None,
            model: "m".into(),
            endpoint: "/v1/chat/completions".into(),
            input_tokens: input,
            output_tokens: output,
            status: if ok { 200 } else { 400 },
            ok,
            latency_ms: 5,
            cost,
        };
        store
            .insert_usage(&[
                rec(true, 10, 5, 0.5),
                rec(true, 1, 2, 0.25),
                rec(false, 7, 0, 0.0),
            ])
            .unwrap();
        let rows = store.usage(Some("p"), 0, i64::MAX).unwrap();
        assert_eq!(
            rows,
            vec![UsageRow {
                date: "2023-11-14".into(),
                project: "p".into(),
                model: "m".into(),
                requests: 3,
                failed_requests: 1,
                input_tokens: 11,
                output_tokens: 7,
                cost: 0.75,
            }]
        );
        assert!(store.usage(Some("other"), 0, i64::MAX).unwrap().is_empty());
    }
}
