//! The engine: one OS thread that owns the scheduler, the KV cache and the model runner, and
//! steps them in a loop. Only channels cross into it: [`EngineHandle::add`] sends a request and
//! returns the stream of its tokens; dropping that stream cancels the request, and its blocks
//! are freed on the next step.

mod core;
mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use tokio::sync::mpsc as tokio_mpsc;

pub use self::core::{spawn, EngineConfig};
pub use stats::EngineStats;

use crate::ids::{RequestId, TokenId};
use crate::sampling::{Constraint, Sampled, SamplingParams};
use crate::scheduler::Priority;

/// A validated generation request, in token ids.
#[derive(Debug)]
pub struct EngineRequest {
    pub prompt: Vec<TokenId>,
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens that end generation (EOS); empty to ignore EOS.
    pub stop_token_ids: Vec<TokenId>,
    pub priority: Priority,
    /// Structured output: which tokens may come next.
    pub constraint: Option<Constraint>,
    /// Report the prompt's log-probabilities, with this many alternatives per token (the whole
    /// prompt is then computed, none of it taken from the prefix cache).
    pub prompt_logprobs: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token (or, decided in serving, a stop string).
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated token.
#[derive(Clone, Debug)]
pub struct EngineOutput {
    pub sampled: Sampled,
    /// Set on the request's last token.
    pub finish: Option<FinishReason>,
    /// Prompt tokens found in the prefix cache (reported on the first token).
    pub cached_prompt_tokens: usize,
    /// With `prompt_logprobs`, on the first token: each prompt token's entry (the first, which
    /// nothing predicts, without a log-probability).
    pub prompt_logprobs: Vec<Sampled>,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the engine has stopped: {0}")]
    Stopped(String),
    #[error("the model failed while generating: {0}")]
    Model(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The request's structured-output grammar could not go on; other requests are unaffected.
    #[error("the output grammar failed: {0}")]
    Constraint(String),
}

pub(crate) enum Command {
    Add {
        id: RequestId,
        req: EngineRequest,
        out: tokio_mpsc::UnboundedSender<Result<EngineOutput, EngineError>>,
    },
    Shutdown,
}

/// The serving side's handle on an engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    next_id: Arc<AtomicU64>,
    healthy: Arc<AtomicBool>,
    pub stats: Arc<EngineStats>,
    /// Longest prompt + output one request may have.
    pub max_request_tokens: usize,
}

/// The tokens of one request as they are generated. Dropping it cancels the request.
pub struct RequestStream {
    pub id: RequestId,
    rx: tokio_mpsc::UnboundedReceiver<Result<EngineOutput, EngineError>>,
}

impl RequestStream {
    /// The next token, or `None` once the request has finished.
    pub async fn next(&mut self) -> Option<Result<EngineOutput, EngineError>> {
        self.rx.recv().await
    }
}

impl EngineHandle {
    pub fn add(&self, req: EngineRequest) -> Result<RequestStream, EngineError> {
        if !self.is_healthy() {
            return Err(EngineError::Stopped(
                "an earlier failure stopped the engine".into(),
            ));
        }
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (out, rx) = tokio_mpsc::unbounded_channel();
        self.tx
            .send(Command::Add { id, req, out })
            .map_err(|_| EngineError::ShuttingDown)?;
        Ok(RequestStream { id, rx })
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Asks the engine to fail what is in flight and stop.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}
