use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Parser, Subcommand};

mod cli;

use candela::catalog::Catalog;
use candela::fetch;
use candela::platform::{DefaultLimits, Platform, PlatformConfig};
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
    Serve(Box<ServeArgs>),
    /// Benchmark a server (or, with --offline, an in-process engine) the way `vllm bench serve`
    /// does, with the same flags and result keys.
    ///
    /// Example: candela bench --base-url http://127.0.0.1:8080 --dataset-name random
    ///   --random-input-len 128 --random-output-len 128 --num-prompts 64 --max-concurrency 16
    ///   --ignore-eos --save-result
    Bench(Box<candela::bench::BenchArgs>),
    /// Download the default models (or the given ones) into the cache and exit.
    ///
    /// Example: candela fetch --model all-minilm-l6-v2
    Fetch {
        /// Catalog id to fetch; repeatable. Default: every catalog model.
        #[arg(long = "model", value_name = "ID")]
        models: Vec<String>,
    },
    /// Create, list and revoke access tokens (in $CANDELA_HOME/candela.db; a server running on
    /// the same directory sees each change within a second).
    ///
    /// Example: candela token create --project research --ttl 30d --name ci
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Set a project's rate limits (a running server applies them within a second), or list them.
    ///
    /// Example: candela project set research --rpm 100 --tpm 200000 --embeddings-rpm 1000
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Calls, tokens and estimated cost per project, model and day, from the usage log.
    ///
    /// Example: candela usage --project research --from 2026-11-01
    Usage(UsageArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token; it is printed once, alone on the last line (only its hash is stored).
    Create {
        /// The project the token calls for (created with default limits when new).
        #[arg(long)]
        project: String,
        /// Validity period: a number and a unit, s, m, h, d or w (e.g. 30d, 12h).
        #[arg(long, default_value = "30d")]
        ttl: String,
        /// A label to recognize it by in `token list`.
        #[arg(long)]
        name: Option<String>,
    },
    /// One line per token, starting with its id (the secret is never shown again).
    List {
        #[arg(long)]
        project: Option<String>,
    },
    /// Revoke a token by its id; calls with it get 401 from then on.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Set limits; an omitted flag keeps its value, 0 returns to the server's default.
    Set {
        name: String,
        /// Requests per minute (chat and completions).
        #[arg(long)]
        rpm: Option<u64>,
        /// Tokens per minute (prompt + generated, chat and completions).
        #[arg(long)]
        tpm: Option<u64>,
        /// Embeddings requests per minute.
        #[arg(long)]
        embeddings_rpm: Option<u64>,
    },
    /// One line per project with its limits.
    List,
}

#[derive(clap::Args)]
struct UsageArgs {
    /// Only this project. Default: every project.
    #[arg(long)]
    project: Option<String>,
    /// First day (YYYY-MM-DD, UTC), an RFC 3339 time or Unix seconds. Default: 30 days ago.
    #[arg(long)]
    from: Option<String>,
    /// Last day, included (same formats). Default: now.
    #[arg(long)]
    to: Option<String>,
    /// Print JSON (as GET /v1/usage does) instead of a table.
    #[arg(long)]
    json: bool,
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
    /// Most sequences running at once per model. Default: 64 on the CPU, 256 on a GPU.
    #[arg(long, value_name = "N")]
    max_num_seqs: Option<usize>,
    /// Most tokens in one engine step (prefill chunks + decodes). Default: 256 on the CPU, 2048
    /// on a GPU.
    #[arg(long, value_name = "N")]
    max_num_batched_tokens: Option<usize>,
    /// Most prompt tokens in one engine step where streams decode, however many: bounds the
    /// delay a new prompt adds to every running stream's next token (a step with no stream
    /// decoding takes prompts up to --max-num-batched-tokens). Default: 32 on the CPU (where a
    /// step's time grows with its tokens), --max-num-batched-tokens on a GPU.
    #[arg(long, value_name = "N")]
    max_batch_prefill_tokens: Option<usize>,
    /// A catalog file (TOML, like models/catalog.toml) to serve instead of the built-in one.
    #[arg(long, value_name = "FILE")]
    catalog: Option<PathBuf>,
    /// Calls without an access token: `allow` (rate limited per client address by
    /// --anonymous-rpm) or `deny` (401).
    #[arg(long, default_value = "allow", value_parser = ["allow", "deny"])]
    anonymous: String,
    /// Requests per minute of each anonymous client address (chat and completions); 0: unlimited.
    #[arg(long, default_value_t = 200)]
    anonymous_rpm: u64,
    /// Embeddings requests per minute of each anonymous client address; 0: unlimited.
    #[arg(long, default_value_t = 1000)]
    anonymous_embeddings_rpm: u64,
    /// Requests per minute of a project that sets none (`candela project set`); 0: unlimited.
    #[arg(long, default_value_t = 400)]
    default_rpm: u64,
    /// Embeddings requests per minute of a project that sets none; 0: unlimited.
    #[arg(long, default_value_t = 2000)]
    default_embeddings_rpm: u64,
    /// Tokens per minute of a project that sets none; 0: unlimited.
    #[arg(long, default_value_t = 0)]
    default_tpm: u64,
    /// Largest request body, in bytes; larger ones get 413.
    #[arg(long, default_value_t = 2 * 1024 * 1024)]
    max_body_bytes: usize,
    /// Largest file uploaded to /v1/files (a batch's input), in bytes; larger ones get 413.
    #[arg(long, default_value_t = 512 * 1024 * 1024)]
    max_file_bytes: u64,
    /// Most inputs in one embeddings request, and most documents (or texts on a side) in one
    /// rerank or score request.
    #[arg(long, default_value_t = 25)]
    max_embedding_inputs: usize,
    /// `auto`: weights from each --model source. `dummy`: each --model is a Hugging Face Llama
    /// config.json (see models/configs/) loaded with random weights at its real shapes, to
    /// measure speed at real sizes without downloading weights (benchmark it with
    /// `candela bench --tokenizer CONFIG.json`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "dummy"])]
    load_format: String,
    /// Skip the start-up speed measurement that `@fastest` ranks by.
    #[arg(long)]
    no_calibrate: bool,
    /// Dense weights and activations (the KV cache has --kv-cache-dtype): `auto` (bfloat16 on a
    /// GPU, float32 on the CPU), `bfloat16`, `float16` (or `half`) or `float32` (or `float`).
    /// GGUF models keep their quantized weights; on the CPU they compute in float32.
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    dtype: DtypeArg,
    /// What the KV cache holds: `auto` (float16 on the CPU when the model computes in float32:
    /// half the bytes every decode step reads and twice the tokens per GiB, as llama.cpp's
    /// default; on a GPU the model's dtype), `float16`, `bfloat16` or `float32` (a GPU takes only
    /// the model's dtype).
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    kv_cache_dtype: DtypeArg,
    /// CPU, quantized (GGUF) models: how prompt tokens' activations enter the integer kernel.
    /// `high`: as two int8 terms per block of 32 (the codes and their rounding error's codes,
    /// about 15 bits), so that the KV cache every later token reads is computed almost as in
    /// float32. `int8`: as one term, as llama.cpp computes every token (generated tokens always
    /// take one): up to twice the prompt throughput on CPUs without AVX-512 VNNI, 10-30 % more
    /// with it; greedy text can differ. `auto`: `high` where the CPU has AVX-512 VNNI, `int8`
    /// elsewhere.
    #[arg(long, default_value = "auto", value_parser = ["auto", "high", "int8"])]
    prompt_precision: String,
    /// Guards the admin API (/admin/v1/...) and /metrics; unset, the admin API is off and
    /// /metrics is open.
    #[arg(long, env = "CANDELA_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

/// `--dtype`: a dtype, or `None` for the device's default.
#[derive(Clone, Debug)]
struct DtypeArg(Option<DType>);

/// vLLM's `--dtype` names.
fn parse_dtype(spec: &str) -> Result<DtypeArg, String> {
    match spec {
        "auto" => Ok(DtypeArg(None)),
        "bfloat16" | "bf16" => Ok(DtypeArg(Some(DType::BF16))),
        "float16" | "half" | "f16" => Ok(DtypeArg(Some(DType::F16))),
        "float32" | "float" | "f32" => Ok(DtypeArg(Some(DType::F32))),
        _ => Err("expected auto, bfloat16, float16 (half) or float32 (float)".into()),
    }
}

/// candle runs large elementwise CPU ops (64K elements and more: a 128-token prompt chunk of a
/// 576-wide model, a 32-token one of a 2048-wide model) on a pool of its own whose worker spins
/// some 25,000 pauses (about half a millisecond) after each op before it sleeps; the quantized
/// matmul and attention kernels that run next want every core, so the spinning worker took one
/// from them (10 % of a long prompt's profile in that thread; a 1024-token prompt in 128-token
/// chunks 11-16 % slower). A short spin keeps the pool for back-to-back ops and frees the core.
/// Set before any thread starts, as the variable is read once, when candle makes the pool; a
/// value in the environment wins.
fn shorten_candle_pool_spin() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "100");
    }
}

/// candle's CPU matmul asks for its thread count on every call, and unless `RAYON_NUM_THREADS`
/// is set the answer counts physical cores by reading and parsing `/proc/cpuinfo` again (34 µs
/// on a 2-core machine, far more on a large one; an embedding model's forward pass runs dozens
/// of such matmuls). Setting the variable to the pool size rayon would pick anyway (the CPUs
/// this process may use) leaves every pool as it was and makes the question an environment
/// lookup. Set before any thread starts; a value in the environment wins.
fn pin_rayon_thread_count() {
    const VAR: &str = "RAYON_NUM_THREADS";
    if std::env::var_os(VAR).is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var(VAR, n.to_string());
    }
}

fn main() -> anyhow::Result<()> {
    shorten_candle_pool_spin();
    pin_rayon_thread_count();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
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
        Command::Serve(args) => serve(*args, home).await,
        Command::Bench(args) => Ok(candela::bench::run(*args, home).await?),
        Command::Token { command } => {
            cli::quiet_broken_pipe();
            cli::token(command, &home)
        }
        Command::Project { command } => {
            cli::quiet_broken_pipe();
            cli::project(command, &home)
        }
        Command::Usage(args) => {
            cli::quiet_broken_pipe();
            cli::usage(args, &home)
        }
    }
}

async fn serve(args: ServeArgs, home: PathBuf) -> anyhow::Result<()> {
    let device = candela::serving::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    // On the CPU a step's time grows with its tokens, so small prefill chunks keep the streams
    // beside a prompt moving: at 16 concurrent streams, 64 prompt tokens per step against 256
    // cut the P99 inter-token latency from about 370 ms to 145 ms, and 32 against 64 from about
    // 95 ms to 60 ms, for 1-2 % of throughput. A prompt with no stream decoding beside it is not
    // capped (the scheduler gives it the whole step budget). A GPU takes big chunks for about
    // the price of small ones.
    let max_num_batched_tokens =
        args.max_num_batched_tokens
            .unwrap_or(if device.is_cpu() { 256 } else { 2048 });
    let max_batch_prefill_tokens = args.max_batch_prefill_tokens.unwrap_or(if device.is_cpu() {
        32
    } else {
        max_num_batched_tokens
    });
    // A GPU step costs about the same for 64 decoding sequences as for 256 (its weights are read
    // once either way), so it takes as many as vLLM does by default.
    let max_num_seqs = args
        .max_num_seqs
        .unwrap_or(if device.is_cpu() { 64 } else { 256 });
    if args.block_size == 0
        || max_num_seqs == 0
        || max_num_batched_tokens == 0
        || max_batch_prefill_tokens == 0
    {
        bail!("--block-size, --max-num-seqs, --max-num-batched-tokens and --max-batch-prefill-tokens must be positive");
    }
    let opts = ServeOptions {
        sources: args.models,
        device,
        home,
        kv_cache_bytes: args
            .kv_cache_memory
            .map(|g| (g * (1u64 << 30) as f64) as u64),
        block_size: args.block_size,
        max_num_seqs,
        max_num_batched_tokens,
        max_batch_prefill_tokens,
        catalog: args.catalog,
        calibrate: !args.no_calibrate,
        dummy_weights: args.load_format == "dummy",
        dtype: args.dtype.0,
        kv_cache_dtype: args.kv_cache_dtype.0,
        precise_prompts: match args.prompt_precision.as_str() {
            "high" => true,
            "int8" => false,
            _ => candela::runner::default_precise_prompts(),
        },
    };
    tracing::info!(
        device = ?opts.device,
        home = %opts.home.display(),
        precise_prompts = opts.precise_prompts,
        "starting"
    );
    if opts.dummy_weights && opts.sources.is_empty() {
        bail!(
            "--load-format dummy needs --model CONFIG.json (e.g. models/configs/llama-3.1-8b.json)"
        );
    }
    let limit = |n: u64| (n > 0).then_some(n);
    let platform = Platform::open(PlatformConfig {
        allow_anonymous: args.anonymous == "allow",
        anonymous_limits: DefaultLimits {
            rpm: limit(args.anonymous_rpm),
            embeddings_rpm: limit(args.anonymous_embeddings_rpm),
            tpm: None,
        },
        project_limits: DefaultLimits {
            rpm: limit(args.default_rpm),
            embeddings_rpm: limit(args.default_embeddings_rpm),
            tpm: limit(args.default_tpm),
        },
        admin_token: args.admin_token.filter(|t| !t.is_empty()),
        max_body_bytes: args.max_body_bytes,
        max_file_bytes: args.max_file_bytes,
        max_embedding_inputs: args.max_embedding_inputs.max(1),
        ..PlatformConfig::new(opts.home.clone())
    })?;
    let registry = tokio::task::spawn_blocking(move || load_registry(&opts)).await??;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "serving the OpenAI API at http://{}/v1", listener.local_addr()?);
    candela::serve(listener, registry, platform, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
