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
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Arc::new(api::AppState { registry });
    let app = api::router(state.clone());
    let stopper = state.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: ending in-flight requests");
            stopper.registry.shutdown();
        })
        .await
}
