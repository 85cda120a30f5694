//! Serving: everything between the HTTP types and the engine. Resolves the model, renders chat
//! templates, tokenizes, validates against the context, and turns the engine's token stream into
//! text (incremental detokenization, stop strings, log-probabilities).

mod calibrate;
mod detokenizer;
mod embed;
mod error;
mod generate;
mod registry;
mod stop;
mod template;

pub use detokenizer::Detokenizer;
pub use embed::EmbeddingModel;
pub use error::ServingError;
pub use generate::{ChatModel, GenChunk, GenParams, Generation, TokenLogprob};
pub use registry::{load_registry, ModelInfo, Registry, ServeOptions, Served, Want};
pub use template::ChatMessage;
