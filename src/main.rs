use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Parser, Subcommand};

use candela::catalog::Catalog;
use candela::fetch;
use candela::serving::{load_registry, ServeOptions};

/// candela: a self-hosted, OpenAI-compatible inference endpoint (chat, completions, embeddings)
/// with continuous batching over a paged KV cache.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API.
    ///
    /// With no --model, serves the default catalog (SmolLM2-135M-Instruct for chat,
    /// all-MiniLM-L6-v2 for embeddings), fetching the weights into $CANDELA_HOME on first run.
    ///
    /// Example: candela serve --port 8080 --model smollm2-135m-instruct --model ./my-model.gguf
    Serve(ServeArgs),
    /// Benchmark a server (or, with --offline, an in-process engine) the way `vllm bench serve`
    /// does, with the same flags and result keys.
    ///
    /// Example: candela bench --base-url http://127.0.0.1:8080 --dataset-name random
    ///   --random-input-len 128 --random-output-len 128 --num-prompts 64 --max-concurrency 16
    ///   --ignore-eos --save-result
    Bench(candela::bench::BenchArgs),
    /// Download the default models (or the given ones) into the cache and exit.
    ///
    /// Example: candela fetch --model all-minilm-l6-v2
    Fetch {
        /// Catalog id to fetch; repeatable. Default: every catalog model.
        #[arg(long = "model", value_name = "ID")]
        models: Vec<String>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Device: `auto` (the first CUDA GPU if built with --features cuda and one is present, else
    /// the CPU), `cpu`, or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// A model to serve: a catalog id (e.g. smollm2-135m-instruct), a .gguf file, or a Hugging Face
    /// directory (config.json + safetensors + tokenizer.json). Repeatable. Default: the catalog.
    #[arg(long = "model", value_name = "SOURCE")]
    models: Vec<String>,
    /// KV-cache memory per chat model, in GiB (e.g. 0.5). Default: sized from free memory
    /// (CPU: a quarter of available RAM, at most 4 GiB; GPU: 80% of free device memory).
    #[arg(long, value_name = "GIB")]
    kv_cache_memory: Option<f64>,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Most sequences running at once per model.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Most tokens in one engine step (prefill chunks + decodes): bounds the latency a long prompt
    /// adds to the streams running beside it.
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
}

fn parse_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        s => {
            let Some(n) = s
                .strip_prefix("cuda:")
                .or_else(|| (s == "cuda").then_some("0"))
            else {
                bail!("--device `{s}`: expected auto, cpu, cuda or cuda:N");
            };
            let n: usize = n
                .parse()
                .with_context(|| format!("--device `{s}`: bad GPU index"))?;
            Device::new_cuda(n).with_context(|| {
                format!("--device `{s}` (was candela built with --features cuda?)")
            })
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "candela=info,tower_http=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let home: PathBuf = fetch::candela_home();
    match cli.command {
        Command::Fetch { models } => {
            let catalog = Catalog::builtin();
            let ids: Vec<String> = if models.is_empty() {
                catalog.ids().iter().map(|s| s.to_string()).collect()
            } else {
                models
            };
            for id in ids {
                let entry = catalog.get(&id).with_context(|| {
                    format!("`{id}` is not a catalog id ({})", catalog.ids().join(", "))
                })?;
                let path = fetch::fetch(entry, &home)?;
                println!("{id}\t{}", path.display());
            }
            Ok(())
        }
        Command::Serve(args) => serve(args, home).await,
        Command::Bench(args) => Ok(candela::bench::run(args, home).await?),
    }
}

async fn serve(args: ServeArgs, home: PathBuf) -> anyhow::Result<()> {
    if args.block_size == 0 || args.max_num_seqs == 0 || args.max_num_batched_tokens == 0 {
        bail!("--block-size, --max-num-seqs and --max-num-batched-tokens must be positive");
    }
    let device = parse_device(&args.device)?;
    tracing::info!(device = ?device, home = %home.display(), "starting");
    let opts = ServeOptions {
        sources: args.models,
        device,
        home,
        kv_cache_bytes: args
            .kv_cache_memory
            .map(|g| (g * (1u64 << 30) as f64) as u64),
        block_size: args.block_size,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
    };
    let registry = tokio::task::spawn_blocking(move || load_registry(&opts)).await??;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving the OpenAI API at http://{}/v1", listener.local_addr()?);
    candela::serve(listener, registry, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
