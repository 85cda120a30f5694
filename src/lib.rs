//! candela: a self-hosted, OpenAI-compatible inference endpoint.
//!
//! A request flows `api` (HTTP, JSON, SSE) -> `serving` (model lookup, chat template, tokenizer,
//! validation) -> `engine` (its own thread: `scheduler` + `kv_cache` + `runner`) and back as a
//! stream of tokens that `serving` turns into text.

pub mod api;
pub mod bench;
pub mod catalog;
pub mod engine;
pub mod fetch;
pub mod ids;
pub mod kv_cache;
pub mod platform;
pub mod runner;
pub mod sampling;
pub mod scheduler;
pub mod serving;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

/// Serves the API on `listener` until `shutdown` resolves; then in-flight requests end with an
/// error (streams get an error event) and the engines stop.
pub async fn serve(
    listener: TcpListener,
    registry: serving::Registry,
    platform: Arc<platform::Platform>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Changes made by `candela token|project` on the same database reach the server this fast.
    platform.spawn_reloader(std::time::Duration::from_millis(250));
    let background = Arc::new(api::BackgroundRuns::open(&platform.config.data_dir));
    let state = Arc::new(api::AppState {
        registry,
        platform,
        batch_lock: Default::default(),
        background,
    });
    let app =
        api::router(state.clone()).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // Batches left unfinished when the server last stopped run again; background responses
    // that a stopped server left are marked failed.
    tokio::spawn(api::resume(state.clone()));
    let stopper = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: ending in-flight requests");
            stopper.registry.shutdown();
        })
        .await?;
    // Background runs end once the engines stop: their end is stored before the server exits.
    state
        .background
        .wait_all(std::time::Duration::from_secs(10))
        .await;
    Ok(())
}
