//! `infergate-runtime`: serves one model for one task over HTTP.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use runtime::admission::{AdmissionLimits, Slowdown};
use runtime::app::{Runtime, Settings, Task};
use runtime::batching::BatchLimits;
use tch::Kind;

/// Serves a model from a local directory (Hugging Face layout) for one task.
#[derive(Debug, Parser)]
#[command(
    name = "infergate-runtime",
    version,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,

    /// What the model does: embedding, text-classification, rerank, tabular, text-generation,
    /// translation, speech-recognition, text-to-speech or text-to-image.
    #[arg(long, env = "INFERGATE_TASK", required = true)]
    task: Option<Task>,

    /// Directory with config.json, model.safetensors and tokenizer.json; for tabular, model.pt
    /// (TorchScript) and signature.json (MLflow tensor spec).
    #[arg(long, env = "INFERGATE_MODEL_DIR", required = true)]
    model_dir: Option<PathBuf>,

    /// Address to serve HTTP on.
    #[arg(long, env = "INFERGATE_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,

    /// Name reported by /info and /v1/models; the directory's name when unset.
    #[arg(long, env = "INFERGATE_MODEL_ID")]
    model_id: Option<String>,

    /// Padded tokens (sequences × longest sequence) in one forward pass.
    #[arg(long, env = "INFERGATE_MAX_BATCH_TOKENS", default_value_t = 16384)]
    max_batch_tokens: usize,

    /// Sequences in one forward pass.
    #[arg(long, env = "INFERGATE_MAX_BATCH_REQUESTS", default_value_t = 64)]
    max_batch_requests: usize,

    /// Requests admitted at once; more get 429 with Retry-After. Default (docs/architecture.md,
    /// limits): 128 for text-generation, 512 for the encoder and tabular tasks.
    #[arg(long, env = "INFERGATE_MAX_CONCURRENT_REQUESTS")]
    max_concurrent_requests: Option<usize>,

    /// Largest predicted slowdown a request is taken at: its completion time behind the work
    /// already taken (for text generation: the running and waiting sequences), over its time
    /// on an idle model, from the model's measured cost per pass stretched by the measured
    /// error of those predictions; nor may it push a request already taken past that bound.
    /// Beyond it, 429 with Retry-After at once. This bound holds once the model has been busy
    /// without a break for 8 times the request's time alone; earlier, --burst-slowdown does.
    /// 0 turns the rule off (the count limit alone).
    #[arg(long, env = "INFERGATE_MAX_SLOWDOWN", default_value_t = 2.0)]
    max_slowdown: f64,

    /// The slowdown bound early in a busy period, so that requests bunching up by chance on a
    /// model that keeps up are queued rather than refused. Default: twice --max-slowdown;
    /// equal to it, no allowance for bursts.
    #[arg(long, env = "INFERGATE_BURST_SLOWDOWN")]
    burst_slowdown: Option<f64>,

    /// Inputs in one request; more get 422.
    #[arg(long, env = "INFERGATE_MAX_CLIENT_BATCH_SIZE", default_value_t = 32)]
    max_client_batch_size: usize,

    /// Weight precision: float32, float16 or bfloat16 (half precision needs CUDA). Default:
    /// float16 for text-to-image on CUDA, float32 otherwise.
    #[arg(long, env = "INFERGATE_DTYPE")]
    dtype: Option<String>,

    /// libtorch intra-op threads; libtorch's default (the machine's cores) when unset.
    #[arg(long, env = "INFERGATE_TORCH_THREADS")]
    torch_threads: Option<i32>,

    /// text-generation: sequences decoded together (the KV cache's slots, allocated at start).
    #[arg(long, env = "INFERGATE_MAX_RUNNING_SEQUENCES", default_value_t = 32)]
    max_running_sequences: usize,

    /// text-generation: prompt plus generated tokens of one sequence (at most the model's
    /// max_position_embeddings).
    #[arg(long, env = "INFERGATE_MAX_SEQUENCE_TOKENS", default_value_t = 4096)]
    max_sequence_tokens: usize,

    /// text-generation: prompt tokens prefilled between two decode steps of the running batch.
    #[arg(long, env = "INFERGATE_MAX_PREFILL_TOKENS", default_value_t = 4096)]
    max_prefill_tokens: usize,

    /// text-generation: sampling defaults for requests that set none.
    #[arg(long, env = "INFERGATE_DEFAULT_TEMPERATURE", default_value_t = 0.7)]
    default_temperature: f32,
    #[arg(long, env = "INFERGATE_DEFAULT_TOP_P", default_value_t = 0.9)]
    default_top_p: f32,
    #[arg(long, env = "INFERGATE_DEFAULT_MAX_NEW_TOKENS", default_value_t = 1024)]
    default_max_new_tokens: usize,

    /// speech-recognition: largest audio upload, in bytes; larger ones get 413.
    #[arg(long, env = "INFERGATE_MAX_AUDIO_BYTES", default_value_t = 25 * 1024 * 1024)]
    max_audio_bytes: usize,

    /// speech-recognition: longest audio, in seconds; longer gets 413 (decoding stops there).
    #[arg(long, env = "INFERGATE_MAX_AUDIO_SECONDS", default_value_t = 600)]
    max_audio_seconds: u64,

    /// Log lines as JSON objects instead of text.
    #[arg(long, env = "INFERGATE_LOG_JSON")]
    log_json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch the model of an https:// ModelDeployment into DEST (the operator runs this as the
    /// runtime pod's init container): checks --sha256, unpacks .tar/.tar.gz/.tgz archives.
    Download {
        #[arg(long)]
        url: String,
        /// Lower-case hex SHA-256 the downloaded body must have.
        #[arg(long)]
        sha256: Option<String>,
        #[arg(long)]
        dest: PathBuf,
    },
    /// The chat-template sandbox's helper: renders JSON-line requests from stdin (started by
    /// the runtime itself under a memory limit; not for direct use).
    #[command(hide = true)]
    RenderTemplates,
}

fn download(url: String, sha256: Option<String>, dest: PathBuf) -> anyhow::Result<()> {
    let download = runtime::download::Download { url, sha256, dest };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(download.run())?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // symphonia reports each unknown chunk of an upload at info: one line per request.
        .add_directive("symphonia=warn".parse().expect("a static directive"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if args.log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let (task, model_dir) = match (args.command, args.task, args.model_dir) {
        (Some(Command::Download { url, sha256, dest }), _, _) => {
            return download(url, sha256, dest);
        }
        (Some(Command::RenderTemplates), _, _) => {
            return Ok(runtime::generate::sandbox::serve_renders()?);
        }
        (None, Some(task), Some(model_dir)) => (task, model_dir),
        (None, _, _) => unreachable!("clap requires --task and --model-dir without a subcommand"),
    };
    let device = runtime::device::inference_device();
    let dtype = args.dtype.clone().unwrap_or_else(|| {
        if task == Task::TextToImage && device.is_cuda() {
            "float16".to_owned()
        } else {
            "float32".to_owned()
        }
    });
    let kind = match dtype.as_str() {
        "float32" => Kind::Float,
        "float16" if device.is_cuda() => Kind::Half,
        "bfloat16" if device.is_cuda() => Kind::BFloat16,
        "float16" | "bfloat16" => {
            anyhow::bail!("--dtype {dtype} needs a CUDA device; this machine has none")
        }
        other => anyhow::bail!("--dtype {other:?}: expected float32, float16 or bfloat16"),
    };
    // Below 1 even a request on an idle model would be refused.
    if !(args.max_slowdown == 0.0 || args.max_slowdown >= 1.0 && args.max_slowdown.is_finite()) {
        anyhow::bail!(
            "--max-slowdown {}: expected 0 (off) or a number of at least 1",
            args.max_slowdown
        );
    }
    let slowdown = (args.max_slowdown > 0.0).then(|| Slowdown {
        burst: args.burst_slowdown.unwrap_or(2.0 * args.max_slowdown),
        ..Slowdown::new(args.max_slowdown)
    });
    if let Some(Slowdown { sustained, burst }) = slowdown
        && !(burst >= sustained && burst.is_finite())
    {
        anyhow::bail!(
            "--burst-slowdown {burst}: expected a number of at least --max-slowdown ({sustained})"
        );
    }
    if let Some(threads) = args.torch_threads {
        tch::set_num_threads(threads);
    }
    let settings = Settings {
        task,
        model_dir,
        listen: args.listen,
        model_id: args.model_id,
        limits: BatchLimits {
            max_batch_tokens: args.max_batch_tokens,
            max_batch_sequences: args.max_batch_requests,
            admission: AdmissionLimits {
                max_concurrent_requests: args.max_concurrent_requests.unwrap_or(
                    if task == Task::TextGeneration {
                        128
                    } else {
                        512
                    },
                ),
                max_slowdown: slowdown,
            },
        },
        max_client_batch_size: args.max_client_batch_size,
        device,
        kind,
        generation: runtime::app::GenerationSettings {
            max_running: args.max_running_sequences,
            max_sequence_tokens: Some(args.max_sequence_tokens),
            max_prefill_tokens_per_step: args.max_prefill_tokens,
            defaults: runtime::tasks::generation::GenerationDefaults {
                temperature: args.default_temperature,
                top_p: args.default_top_p,
                max_new_tokens: args.default_max_new_tokens,
            },
        },
        audio: runtime::tasks::transcribe::AudioLimits {
            max_upload_bytes: args.max_audio_bytes,
            max_seconds: args.max_audio_seconds,
        },
    };
    let listen = settings.listen;
    let runtime = Runtime::build(settings, runtime::metrics::Metrics::new())?;
    let model_thread = runtime.model_thread;
    let server = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    server.block_on(async move {
        // A model that cannot load ends the process, so an orchestrator restarts it visibly.
        let watcher = tokio::task::spawn_blocking(move || model_thread.join());
        tokio::select! {
            served = runtime::server::serve(listen, runtime.router) => served.map_err(anyhow::Error::from),
            loaded = watcher => match loaded {
                Ok(Ok(Err(message))) => Err(anyhow::anyhow!("loading the model failed: {message}")),
                _ => Err(anyhow::anyhow!("the model thread stopped")),
            },
        }
    })
}
