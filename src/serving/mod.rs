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
mod structured;
mod template;
pub mod tools;

pub use detokenizer::Detokenizer;
pub use embed::EmbeddingModel;
pub use error::ServingError;
pub use generate::{ChatModel, GenChunk, GenParams, Generation, TokenLogprob, TurnEnd};
pub use registry::{load_registry, ModelInfo, Registry, ServeOptions, Served, Want};
pub use structured::{Grammar, OutputFormat};
pub use template::ChatMessage;

use candle_core::Device;

/// A `--device` value: `auto` (the first CUDA GPU if this build has CUDA and the machine a GPU,
/// else the CPU), `cpu`, `cuda` or `cuda:N`. A GPU named but not opened is an error, never a
/// quiet fall back to the CPU.
pub fn parse_device(spec: &str) -> Result<Device, String> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(candela_kernels::cuda_if_available()),
        s => {
            let n = s
                .strip_prefix("cuda:")
                .or_else(|| (s == "cuda").then_some("0"))
                .ok_or_else(|| format!("--device `{s}`: expected auto, cpu, cuda or cuda:N"))?;
            let n: usize = n
                .parse()
                .map_err(|_| format!("--device `{s}`: bad GPU index"))?;
            candela_kernels::cuda_device(n).map_err(|e| {
                format!("--device `{s}`: {e} (was candela built with --features cuda?)")
            })
        }
    }
}
