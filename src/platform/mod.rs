//! The platform half of the endpoint: who may call (access tokens, anonymous access, the admin
//! token), how often (rate limits), what it cost (usage metering), how the server is doing
//! (metrics), and which model a query such as `chat@fastest` means (virtual models).

pub mod batches;
pub mod chat_completions;
pub mod conversations;
pub mod files;
pub mod metrics;
pub mod query;
pub mod ratelimit;
pub mod responses;
pub mod store;
pub mod token;
pub mod uploads;
pub mod usage;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use metrics::Metrics;
use ratelimit::{Class, Limits, RateLimiter, Subject};
use store::{ProjectLimits, Store, StoreError, TokenRecord};
use usage::{CallerTag, UsageSink};

/// The project that anonymous calls are metered under.
pub const ANONYMOUS_PROJECT: &str = "anonymous";

/// Requests-per-minute and tokens-per-minute defaults; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DefaultLimits {
    pub rpm: Option<u64>,
    pub embeddings_rpm: Option<u64>,
    pub tpm: Option<u64>,
}

/// How the platform runs (from `candela serve`'s flags).
#[derive(Clone, Debug)]
pub struct PlatformConfig {
    /// Holds the database (`candela.db`) and the uploaded and batch-output files (`files/`).
    pub data_dir: PathBuf,
    pub allow_anonymous: bool,
    /// Limits of each anonymous client address.
    pub anonymous_limits: DefaultLimits,
    /// Limits of a project that sets none of its own.
    pub project_limits: DefaultLimits,
    /// Guards the admin API (and `/metrics`) when set.
    pub admin_token: Option<String>,
    /// The rate-limit window (a minute; shorter in tests).
    pub window: Duration,
    pub max_body_bytes: usize,
    /// Largest upload to `/v1/files`.
    pub max_file_bytes: u64,
    pub max_embedding_inputs: usize,
}

impl PlatformConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            allow_anonymous: true,
            anonymous_limits: DefaultLimits {
                rpm: Some(200),
                embeddings_rpm: Some(1000),
                tpm: None,
            },
            project_limits: DefaultLimits {
                rpm: Some(400),
                embeddings_rpm: Some(2000),
                tpm: None,
            },
            admin_token: None,
            window: Duration::from_secs(60),
            max_body_bytes: 2 * 1024 * 1024,
            max_file_bytes: 512 * 1024 * 1024,
            max_embedding_inputs: 25,
        }
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq)]
pub enum Caller {
    Admin,
    Project { project: String, token_id: String },
    Anonymous(IpAddr),
}

impl Caller {
    pub fn tag(&self) -> CallerTag {
        match self {
            Caller::Admin => CallerTag {
                project: "admin".into(),
                token_id: None,
                subject: Subject::Project("admin".into()),
            },
            Caller::Project { project, token_id } => CallerTag {
                project: project.clone(),
                token_id: Some(token_id.clone()),
                subject: Subject::Project(project.clone()),
            },
            Caller::Anonymous(ip) => CallerTag {
                project: ANONYMOUS_PROJECT.into(),
                token_id: None,
                subject: Subject::Anonymous(*ip),
            },
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("You didn't provide an API key. Pass an access token in the Authorization header (Authorization: Bearer TOKEN); create one with `candela token create --project NAME`.")]
    Missing,
    #[error("Incorrect API key provided. Create an access token with `candela token create --project NAME`.")]
    Invalid,
    #[error("This access token (id {id}) expired at {at}. Create a new one with `candela token create`.")]
    Expired { id: String, at: String },
    #[error("This access token (id {id}) has been revoked.")]
    Revoked { id: String },
}

/// What the server knows of projects and tokens, reloaded whenever the database changes.
#[derive(Default)]
struct Snapshot {
    tokens: HashMap<String, TokenRecord>,
    limits: HashMap<String, ProjectLimits>,
    version: Option<i64>,
}

pub struct Platform {
    pub config: PlatformConfig,
    pub store: Arc<Store>,
    pub limiter: RateLimiter,
    pub metrics: Metrics,
    usage: UsageSink,
    snapshot: RwLock<Snapshot>,
}

impl Platform {
    pub fn open(config: PlatformConfig) -> Result<Arc<Self>, StoreError> {
        let store = Arc::new(Store::open_dir(&config.data_dir)?);
        let platform = Arc::new(Self {
            limiter: RateLimiter::new(config.window),
            metrics: Metrics::new(),
            usage: UsageSink::spawn(store.clone()),
            snapshot: RwLock::new(Snapshot::default()),
            store,
            config,
        });
        platform.reload(true)?;
        Ok(platform)
    }

    /// Reloads projects and tokens when the database changed (or always with `force`).
    pub fn reload(&self, force: bool) -> Result<(), StoreError> {
        let version = self.store.data_version()?;
        if !force && self.read().version == Some(version) {
            return Ok(());
        }
        let tokens = self.store.tokens(None)?;
        let projects = self.store.projects()?;
        let mut s = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        s.tokens = tokens.into_iter().map(|t| (t.id.clone(), t)).collect();
        s.limits = projects.into_iter().map(|p| (p.name, p.limits)).collect();
        s.version = Some(version);
        Ok(())
    }

    /// Keeps the snapshot fresh: changes made by the CLI take effect within `period`.
    pub fn spawn_reloader(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(p) = weak.upgrade() else { return };
                let result = tokio::task::spawn_blocking(move || p.reload(false)).await;
                if let Ok(Err(e)) = result {
                    tracing::warn!(error = %e, "reloading tokens and projects");
                }
            }
        });
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Who a bearer token (or its absence) belongs to.
    pub fn authenticate(&self, bearer: Option<&str>, ip: IpAddr) -> Result<Caller, AuthError> {
        let Some(presented) = bearer else {
            return if self.config.allow_anonymous {
                Ok(Caller::Anonymous(ip))
            } else {
                Err(AuthError::Missing)
            };
        };
        if self.is_admin(presented) {
            return Ok(Caller::Admin);
        }
        if !token::looks_like_token(presented) {
            // OpenAI clients insist on some key ("EMPTY", "none", "sk-..."); where anonymous
            // access is allowed, a key that is not a candela token is no key at all. Anything
            // that looks like a candela token is checked, so an expired, revoked or mistyped
            // one never passes as anonymous.
            return if self.config.allow_anonymous {
                Ok(Caller::Anonymous(ip))
            } else {
                Err(AuthError::Invalid)
            };
        }
        let (id, hash) = token::split(presented).ok_or(AuthError::Invalid)?;
        if !self.read().tokens.contains_key(id) {
            // Made a moment ago by the CLI? Reload now rather than at the next tick (cheap when
            // nothing changed: one PRAGMA).
            if let Err(e) = self.reload(false) {
                tracing::warn!(error = %e, "reloading tokens");
            }
        }
        let snapshot = self.read();
        let record = snapshot.tokens.get(id).ok_or(AuthError::Invalid)?;
        if !token::hashes_equal(&record.hash, &hash) {
            return Err(AuthError::Invalid);
        }
        if record.revoked_at.is_some() {
            return Err(AuthError::Revoked {
                id: record.id.clone(),
            });
        }
        if record.expires_at <= store::now() {
            let at = chrono::DateTime::from_timestamp(record.expires_at, 0)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default();
            return Err(AuthError::Expired {
                id: record.id.clone(),
                at,
            });
        }
        Ok(Caller::Project {
            project: record.project.clone(),
            token_id: record.id.clone(),
        })
    }

    pub fn is_admin(&self, presented: &str) -> bool {
        self.config
            .admin_token
            .as_deref()
            .is_some_and(|admin| token::secrets_equal(admin, presented))
    }

    /// The limits that apply to `caller` for calls of `class`.
    pub fn limits(&self, caller: &Caller, class: Class) -> Limits {
        let (defaults, own) = match caller {
            Caller::Admin => return Limits::default(),
            Caller::Anonymous(_) => (self.config.anonymous_limits, None),
            Caller::Project { project, .. } => (
                self.config.project_limits,
                self.read().limits.get(project).cloned(),
            ),
        };
        let own = own.unwrap_or_default();
        match class {
            Class::Requests => Limits {
                requests: own.rpm.or(defaults.rpm),
                tokens: own.tpm.or(defaults.tpm),
            },
            Class::Embeddings => Limits {
                requests: own.embeddings_rpm.or(defaults.embeddings_rpm),
                tokens: None,
            },
        }
    }

    /// Waits until every finished call is in the database.
    pub async fn flush_usage(&self) {
        self.usage.flush().await;
    }
}
