//! Embedding models run on a worker thread of their own that batches whatever requests are
//! waiting into one forward pass.

use std::sync::{mpsc, Arc};

use candela_models::Embedder;
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

use super::{ModelInfo, ServingError};
use crate::engine::EngineError;

/// Most inputs in one forward pass.
const MAX_BATCH_INPUTS: usize = 64;

struct Job {
    inputs: Vec<Vec<u32>>,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, String>>,
}

pub struct EmbeddingModel {
    pub info: ModelInfo,
    tokenizer: Arc<Tokenizer>,
    /// Token ids below this are valid (the tokenizer's own count copies its whole vocabulary).
    vocab_size: u32,
    tx: mpsc::Sender<Job>,
    max_tokens: usize,
    pub dim: usize,
}

impl EmbeddingModel {
    pub fn spawn(
        info: ModelInfo,
        model: Box<dyn Embedder>,
        tokenizer: Tokenizer,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (max_tokens, dim) = (model.max_tokens(), model.dim());
        // An id past the embeddings' rows is refused here: on a GPU the lookup's bounds check
        // is a device assert, which leaves the device unusable for every later call.
        let vocab_size = tokenizer.get_vocab_size(true).min(model.vocab_size()) as u32;
        std::thread::Builder::new()
            .name(format!("embed-{}", info.id))
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut jobs = vec![first];
                    let mut count = jobs[0].inputs.len();
                    while count < MAX_BATCH_INPUTS {
                        match rx.try_recv() {
                            Ok(job) => {
                                count += job.inputs.len();
                                jobs.push(job);
                            }
                            Err(_) => break,
                        }
                    }
                    let all: Vec<Vec<u32>> =
                        jobs.iter().flat_map(|j| j.inputs.iter().cloned()).collect();
                    match model.embed(&all) {
                        Ok(vectors) => {
                            let mut it = vectors.into_iter();
                            for job in jobs {
                                let mine: Vec<Vec<f32>> =
                                    it.by_ref().take(job.inputs.len()).collect();
                                let _ = job.reply.send(Ok(mine));
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "embedding forward failed");
                            for job in jobs {
                                let _ = job.reply.send(Err(e.to_string()));
                            }
                        }
                    }
                }
            })?;
        Ok(Self {
            info,
            vocab_size,
            tokenizer: Arc::new(tokenizer),
            tx,
            max_tokens,
            dim,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The vocabulary's size and the most tokens an input may have.
    pub fn limits(&self) -> (u32, usize) {
        (self.vocab_size, self.max_tokens)
    }

    /// Tokenizes the inputs (with the model's special tokens).
    pub fn tokenize(&self, inputs: &[String]) -> Result<Vec<Vec<u32>>, ServingError> {
        inputs
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let enc = self.tokenizer.encode(text.as_str(), true).map_err(|e| {
                    ServingError::invalid(
                        "input",
                        format!("input[{i}] could not be tokenized: {e}"),
                    )
                })?;
                Ok(enc.get_ids().to_vec())
            })
            .collect()
    }

    /// Checks that every input is in the vocabulary and fits the model.
    pub fn check_ids(&self, inputs: &[Vec<u32>]) -> Result<(), ServingError> {
        let vocab = self.vocab_size;
        for (i, ids) in inputs.iter().enumerate() {
            if ids.iter().any(|&t| t >= vocab) {
                return Err(ServingError::invalid(
                    "input",
                    format!("input[{i}] holds a token id outside the vocabulary (size {vocab})."),
                ));
            }
            if ids.len() > self.max_tokens {
                return Err(ServingError::invalid(
                    "input",
                    format!(
                        "input[{i}] is {} tokens long; this model's maximum input is {} tokens.",
                        ids.len(),
                        self.max_tokens
                    ),
                ));
            }
        }
        Ok(())
    }

    pub async fn embed(&self, inputs: Vec<Vec<u32>>) -> Result<Vec<Vec<f32>>, ServingError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { inputs, reply })
            .map_err(|_| ServingError::Engine(EngineError::ShuttingDown))?;
        rx.await
            .map_err(|_| ServingError::Engine(EngineError::ShuttingDown))?
            .map_err(|e| ServingError::Engine(EngineError::Model(e)))
    }
}
