//! The runtime's settings: the command line and environment (`Args`) resolved once, with every
//! default and check in one place, into the `Settings` a runtime is built from. Each setting has
//! one name from flag to field to `/info`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tch::{Device, Kind};

use crate::admission::{AdmissionLimits, QueueRule};
use crate::executor::BatchLimits;
use crate::tasks::speech_recognition::AudioLimits;
use crate::tasks::text_generation::http::GenerationDefaults;

/// Tasks this runtime serves natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Task {
    Embedding,
    TextClassification,
    Rerank,
    Tabular,
    TextGeneration,
    Translation,
    SpeechRecognition,
    TextToSpeech,
    TextToImage,
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self
            .to_possible_value()
            .expect("every task has a name on the command line");
        f.write_str(value.get_name())
    }
}

/// Serves a model from a local directory (Hugging Face layout) for one task.
#[derive(Debug, Parser)]
#[command(
    name = "infergate-runtime",
    version,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// What the model does.
    #[arg(long, env = "INFERGATE_TASK", required = true)]
    pub task: Option<Task>,

    /// Directory with config.json, model.safetensors and tokenizer.json; for tabular, model.pt
    /// (TorchScript) and signature.json (MLflow tensor spec).
    #[arg(long, env = "INFERGATE_MODEL_DIR", required = true)]
    pub model_dir: Option<PathBuf>,

    /// Address to serve HTTP on.
    #[arg(long, env = "INFERGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Name reported by /info and /v1/models; the directory's name when unset. With
    /// --internal-keys, also the audience the proxy's JWTs must name.
    #[arg(long, env = "INFERGATE_MODEL_ID")]
    pub model_id: Option<String>,

    /// The proxy's verifying keys (a JWK set, re-read when it changes): every request but
    /// /health and /metrics must then carry a JWT the proxy signed for this model, or gets 401.
    /// Unset, the runtime answers anyone who reaches its port (tests, runs by hand).
    #[arg(long, env = "INFERGATE_INTERNAL_KEYS")]
    pub internal_keys: Option<PathBuf>,

    /// Padded tokens (inputs × longest input) in one forward pass of an encoder.
    #[arg(long, env = "INFERGATE_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,

    /// Inputs in one forward pass (texts for encoders and translation, uploads for speech
    /// recognition; text to speech, text to image and tabular run one request at a time).
    #[arg(long, env = "INFERGATE_MAX_BATCH_REQUESTS", default_value_t = 64)]
    pub max_batch_requests: usize,

    /// Requests admitted at once; more get 429 with Retry-After. Default (docs/architecture.md,
    /// limits): 128 for text-generation, 512 for the other tasks.
    #[arg(long, env = "INFERGATE_MAX_CONCURRENT_REQUESTS")]
    pub max_concurrent_requests: Option<usize>,

    /// Longest predicted wait, in seconds, beyond a request's own time (text generation: to its
    /// first token): beyond it, 429 with Retry-After at once, since the model is not keeping up.
    /// A request whose predicted end is past its deadline is refused the same way. Never
    /// refused: a request the next pass holds while the model is below capacity, such as a burst
    /// at an idle model (text generation: a free slot), and a wait under --wait-floor. Default
    /// (docs/architecture.md, admission): 1 for embedding, text-classification, rerank and
    /// tabular; 5 for text-generation (until the first token); 30 for the tasks whose
    /// requests take seconds. 0 turns the rule off (the count limit alone).
    #[arg(long, env = "INFERGATE_MAX_QUEUE_TIME")]
    pub max_queue_time: Option<f64>,

    /// Predicted waits shorter than this many seconds are never refused, whatever the
    /// deadline; at most --max-queue-time.
    #[arg(long, env = "INFERGATE_WAIT_FLOOR", default_value_t = 0.25)]
    pub wait_floor: f64,

    /// Deadline, in seconds, of a request that sends no OICM-Request-Timeout (the proxy
    /// always forwards one): 504 past it.
    #[arg(long, env = "INFERGATE_DEFAULT_TIMEOUT", default_value_t = 120.0)]
    pub default_timeout: f64,

    /// Inputs in one request; more get 422.
    #[arg(long, env = "INFERGATE_MAX_CLIENT_BATCH_SIZE", default_value_t = 32)]
    pub max_client_batch_size: usize,

    /// Weight precision: float32, float16 or bfloat16 (half precision needs CUDA). Default:
    /// float16 for text-to-image on CUDA, float32 otherwise.
    #[arg(long, env = "INFERGATE_DTYPE")]
    pub dtype: Option<String>,

    /// libtorch intra-op threads; libtorch's default (the machine's cores) when unset.
    #[arg(long, env = "INFERGATE_TORCH_THREADS")]
    pub torch_threads: Option<i32>,

    /// text-generation: sequences decoded together (the KV cache's slots, allocated at start).
    #[arg(long, env = "INFERGATE_MAX_RUNNING_SEQUENCES", default_value_t = 32)]
    pub max_running_sequences: usize,

    /// text-generation: prompt plus generated tokens of one sequence (at most the model's
    /// max_position_embeddings).
    #[arg(long, env = "INFERGATE_MAX_SEQUENCE_TOKENS", default_value_t = 4096)]
    pub max_sequence_tokens: usize,

    /// text-generation: prompt tokens prefilled between two decode steps of the running batch.
    #[arg(long, env = "INFERGATE_MAX_PREFILL_TOKENS", default_value_t = 4096)]
    pub max_prefill_tokens: usize,

    /// text-generation: sampling defaults for requests that set none.
    #[arg(long, env = "INFERGATE_DEFAULT_TEMPERATURE", default_value_t = 0.7)]
    pub default_temperature: f32,
    #[arg(long, env = "INFERGATE_DEFAULT_TOP_P", default_value_t = 0.9)]
    pub default_top_p: f32,
    #[arg(long, env = "INFERGATE_DEFAULT_MAX_NEW_TOKENS", default_value_t = 1024)]
    pub default_max_new_tokens: usize,

    /// speech-recognition: largest audio upload, in bytes; larger ones get 413.
    #[arg(long, env = "INFERGATE_MAX_AUDIO_BYTES", default_value_t = 25 * 1024 * 1024)]
    pub max_audio_bytes: usize,

    /// speech-recognition: longest audio, in seconds; longer gets 413 (decoding stops there).
    #[arg(long, env = "INFERGATE_MAX_AUDIO_SECONDS", default_value_t = 600)]
    pub max_audio_seconds: u64,

    /// Log lines as JSON objects instead of text.
    #[arg(long, env = "INFERGATE_LOG_JSON")]
    pub log_json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fetch a ModelDeployment's model into DEST (the operator runs this as the runtime pod's
    /// init container), through the node cache when --cache is given. Writes a one-line
    /// outcome to --termination-log, which Kubernetes shows as the container's message.
    Download(Box<DownloadArgs>),
    /// The chat-template sandbox's helper: renders JSON-line requests from stdin (started by
    /// the runtime itself under a memory limit; not for direct use).
    #[command(hide = true)]
    RenderTemplates,
}

/// `infergate-runtime download`'s arguments. Store credentials come from files (the operator
/// mounts spec.model.credentialsSecret) or the environment, never from arguments.
#[derive(Debug, clap::Args)]
pub struct DownloadArgs {
    /// `https://HOST/PATH` (one file or a .tar/.tar.gz/.tgz of the model directory),
    /// `s3://BUCKET/PREFIX`, `gs://BUCKET/PREFIX` or `az://CONTAINER/PREFIX`.
    #[arg(long, alias = "url")]
    pub source: String,
    /// Lower-case hex SHA-256 an https body must have.
    #[arg(long)]
    pub sha256: Option<String>,
    #[arg(long)]
    pub dest: PathBuf,
    /// An S3-compatible or Azure endpoint, e.g. http://minio.storage:9000.
    #[arg(long)]
    pub endpoint: Option<String>,
    #[arg(long)]
    pub region: Option<String>,
    /// Path-style S3 addressing (ENDPOINT/BUCKET/KEY), as most self-hosted stores want.
    #[arg(long)]
    pub path_style: bool,
    /// The Secret the credentials came from, named in messages.
    #[arg(long)]
    pub credentials_secret: Option<String>,
    /// The mounted Secret: a file per credential, named as the provider's variable
    /// (AWS_ACCESS_KEY_ID, ...). Without it, the provider's variables and workload identity.
    #[arg(long)]
    pub credentials_dir: Option<PathBuf>,
    /// The node cache's directory; none downloads straight into DEST.
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// The node cache's size bound; least recently used models are evicted beyond it.
    #[arg(long, default_value_t = 100_000_000_000)]
    pub cache_max_bytes: u64,
    /// Range requests in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Bytes per range request.
    #[arg(long, default_value_t = 16 << 20)]
    pub chunk_bytes: u64,
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// Everything needed to start a runtime.
#[derive(Debug, Clone)]
pub struct Settings {
    pub task: Task,
    pub model_dir: PathBuf,
    pub listen: SocketAddr,
    pub model_id: Option<String>,
    /// The proxy's verifying keys; `None` answers unsigned requests.
    pub internal_keys: Option<PathBuf>,
    pub batch: BatchLimits,
    pub max_client_batch_size: usize,
    pub device: Device,
    pub kind: Kind,
    pub torch_threads: Option<i32>,
    /// The deadline of a request without `OICM-Request-Timeout`.
    pub default_timeout: Duration,
    pub generation: GenerationSettings,
    pub audio: AudioLimits,
}

/// Sizes and defaults of text generation.
#[derive(Debug, Clone, Copy)]
pub struct GenerationSettings {
    /// Sequences decoded together (KV cache slots).
    pub max_running_sequences: usize,
    /// Prompt plus output tokens of one sequence, capped at the model's
    /// `max_position_embeddings`.
    pub max_sequence_tokens: usize,
    /// Prompt tokens prefilled between two decode steps.
    pub max_prefill_tokens: usize,
    pub defaults: GenerationDefaults,
}

/// A setting that cannot be served, named by its flag.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    #[error("--dtype {0} needs a CUDA device; this machine has none")]
    HalfPrecisionWithoutCuda(String),
    #[error("--dtype {0:?}: expected float32, float16 or bfloat16")]
    UnknownDtype(String),
    #[error("--max-queue-time {0}: expected 0 (off) or a positive number of seconds")]
    MaxQueueTime(f64),
    #[error(
        "--wait-floor {floor}: expected a number of seconds from 0 to --max-queue-time ({max_queue_time})"
    )]
    WaitFloor { floor: f64, max_queue_time: f64 },
    #[error("--default-timeout {0}: expected a positive number of seconds, at most a day")]
    DefaultTimeout(f64),
    #[error("{0}: expected at least 1")]
    Zero(&'static str),
}

/// The name each precision has on the command line and in `/info`.
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        _ => "float32",
    }
}

impl Settings {
    /// The settings of serving `task` from `model_dir` as `args` ask, on `device`.
    pub fn resolve(
        args: Args,
        task: Task,
        model_dir: PathBuf,
        device: Device,
    ) -> Result<Settings, SettingsError> {
        for (flag, value) in [
            ("--max-batch-tokens", args.max_batch_tokens),
            ("--max-batch-requests", args.max_batch_requests),
            ("--max-client-batch-size", args.max_client_batch_size),
            ("--max-running-sequences", args.max_running_sequences),
            ("--max-sequence-tokens", args.max_sequence_tokens),
            ("--max-prefill-tokens", args.max_prefill_tokens),
            (
                "--max-concurrent-requests",
                args.max_concurrent_requests.unwrap_or(1),
            ),
        ] {
            if value == 0 {
                return Err(SettingsError::Zero(flag));
            }
        }
        let dtype = args.dtype.unwrap_or_else(|| {
            // Stable Diffusion's weights are published for half precision; on a GPU it is what
            // users run.
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
            "float16" | "bfloat16" => return Err(SettingsError::HalfPrecisionWithoutCuda(dtype)),
            _ => return Err(SettingsError::UnknownDtype(dtype)),
        };
        Ok(Settings {
            task,
            model_dir,
            listen: args.listen,
            model_id: args.model_id,
            internal_keys: args.internal_keys,
            batch: BatchLimits {
                max_batch_tokens: args.max_batch_tokens,
                max_batch_requests: args.max_batch_requests,
                admission: AdmissionLimits {
                    max_concurrent_requests: args.max_concurrent_requests.unwrap_or(
                        if task == Task::TextGeneration {
                            128
                        } else {
                            512
                        },
                    ),
                    queue: queue_rule(task, args.max_queue_time, args.wait_floor)?,
                },
            },
            max_client_batch_size: args.max_client_batch_size,
            device,
            kind,
            torch_threads: args.torch_threads,
            default_timeout: default_timeout(args.default_timeout)?,
            generation: GenerationSettings {
                max_running_sequences: args.max_running_sequences,
                max_sequence_tokens: args.max_sequence_tokens,
                max_prefill_tokens: args.max_prefill_tokens,
                defaults: GenerationDefaults {
                    temperature: args.default_temperature,
                    top_p: args.default_top_p,
                    max_new_tokens: args.default_max_new_tokens,
                },
            },
            audio: AudioLimits {
                max_audio_bytes: args.max_audio_bytes,
                max_audio_seconds: args.max_audio_seconds,
            },
        })
    }
}

/// The time rule of `--max-queue-time` and `--wait-floor` for `task`; `None` when turned off.
/// The default queue time is what the task's clients would wait: a fraction of a second per
/// request for the encoders, so a second; seconds per request for speech, images and
/// translation, so half a minute; for text generation, the wait for the first token.
fn queue_rule(
    task: Task,
    max_queue_time: Option<f64>,
    wait_floor: f64,
) -> Result<Option<QueueRule>, SettingsError> {
    let max_queue_time = max_queue_time.unwrap_or(match task {
        Task::Embedding | Task::TextClassification | Task::Rerank | Task::Tabular => 1.0,
        Task::TextGeneration => 5.0,
        Task::Translation | Task::SpeechRecognition | Task::TextToSpeech | Task::TextToImage => {
            30.0
        }
    });
    if max_queue_time == 0.0 {
        return Ok(None);
    }
    if !(max_queue_time > 0.0 && max_queue_time.is_finite()) {
        return Err(SettingsError::MaxQueueTime(max_queue_time));
    }
    if !(0.0..=max_queue_time).contains(&wait_floor) {
        return Err(SettingsError::WaitFloor {
            floor: wait_floor,
            max_queue_time,
        });
    }
    Ok(Some(QueueRule {
        max_queue_time,
        wait_floor,
    }))
}

fn default_timeout(seconds: f64) -> Result<Duration, SettingsError> {
    if !(seconds > 0.0 && seconds <= 86_400.0) {
        return Err(SettingsError::DefaultTimeout(seconds));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(task: Task, flags: &[&str], device: Device) -> Result<Settings, SettingsError> {
        let name = task.to_string();
        let mut argv = vec!["infergate-runtime", "--task", &name, "--model-dir", "/m"];
        argv.extend(flags);
        let args = Args::try_parse_from(argv).expect("flags parse");
        let task = args.task.expect("--task given");
        Settings::resolve(args, task, "/m".into(), device)
    }

    #[test]
    fn tasks_are_named_on_the_command_line_as_in_the_crd() {
        let names: Vec<String> = Task::value_variants().iter().map(Task::to_string).collect();
        assert_eq!(
            names,
            [
                "embedding",
                "text-classification",
                "rerank",
                "tabular",
                "text-generation",
                "translation",
                "speech-recognition",
                "text-to-speech",
                "text-to-image"
            ]
        );
        let unknown = Args::try_parse_from(["r", "--task", "summarization", "--model-dir", "/m"])
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("possible values: embedding"), "{unknown}");
    }

    #[test]
    fn text_generation_admits_fewer_requests_at_once_than_the_other_tasks() {
        let admitted = |task| {
            resolved(task, &[], Device::Cpu)
                .unwrap()
                .batch
                .admission
                .max_concurrent_requests
        };
        assert_eq!(admitted(Task::TextGeneration), 128);
        assert_eq!(admitted(Task::Embedding), 512);
        let set = resolved(
            Task::TextGeneration,
            &["--max-concurrent-requests", "9"],
            Device::Cpu,
        );
        assert_eq!(set.unwrap().batch.admission.max_concurrent_requests, 9);
    }

    #[test]
    fn half_precision_is_the_default_only_for_images_on_a_gpu() {
        let kind = |task, device| resolved(task, &[], device).unwrap().kind;
        assert_eq!(kind(Task::TextToImage, Device::Cuda(0)), Kind::Half);
        assert_eq!(kind(Task::TextToImage, Device::Cpu), Kind::Float);
        assert_eq!(kind(Task::TextGeneration, Device::Cuda(0)), Kind::Float);
        assert_eq!(
            resolved(
                Task::TextGeneration,
                &["--dtype", "bfloat16"],
                Device::Cuda(0)
            )
            .unwrap()
            .kind,
            Kind::BFloat16
        );
    }

    #[test]
    fn a_dtype_the_device_cannot_run_is_refused_by_name() {
        assert_eq!(
            resolved(Task::Embedding, &["--dtype", "float16"], Device::Cpu).unwrap_err(),
            SettingsError::HalfPrecisionWithoutCuda("float16".to_owned())
        );
        let unknown = resolved(Task::Embedding, &["--dtype", "fp8"], Device::Cpu).unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "--dtype \"fp8\": expected float32, float16 or bfloat16"
        );
    }

    #[test]
    fn the_maximum_queue_time_follows_how_long_the_task_s_requests_take() {
        let rule = |task, flags: &[&str]| {
            resolved(task, flags, Device::Cpu).map(|s| s.batch.admission.queue)
        };
        let within = |max_queue_time| {
            Some(QueueRule {
                max_queue_time,
                wait_floor: 0.25,
            })
        };
        assert_eq!(rule(Task::Embedding, &[]).unwrap(), within(1.0));
        assert_eq!(rule(Task::TextGeneration, &[]).unwrap(), within(5.0));
        assert_eq!(rule(Task::TextToImage, &[]).unwrap(), within(30.0));
        assert_eq!(
            rule(Task::Embedding, &["--max-queue-time", "2.5"]).unwrap(),
            within(2.5)
        );
        assert_eq!(
            rule(Task::Embedding, &["--max-queue-time", "0"]).unwrap(),
            None
        );
        assert_eq!(
            rule(Task::Embedding, &["--max-queue-time=-1"]).unwrap_err(),
            SettingsError::MaxQueueTime(-1.0)
        );
        assert!(rule(Task::Embedding, &["--max-queue-time", "NaN"]).is_err());
        assert_eq!(
            rule(Task::Embedding, &["--wait-floor", "2"])
                .unwrap_err()
                .to_string(),
            "--wait-floor 2: expected a number of seconds from 0 to --max-queue-time (1)"
        );
    }

    #[test]
    fn a_request_without_a_deadline_gets_the_default_one() {
        let timeout = |flags: &[&str]| {
            resolved(Task::Embedding, flags, Device::Cpu).map(|s| s.default_timeout)
        };
        assert_eq!(timeout(&[]).unwrap(), Duration::from_secs(120));
        assert_eq!(
            timeout(&["--default-timeout", "2.5"]).unwrap(),
            Duration::from_millis(2500)
        );
        assert_eq!(
            timeout(&["--default-timeout", "0"]).unwrap_err(),
            SettingsError::DefaultTimeout(0.0)
        );
    }

    #[test]
    fn sizes_of_zero_are_refused_by_flag() {
        assert_eq!(
            resolved(Task::Embedding, &["--max-batch-requests", "0"], Device::Cpu).unwrap_err(),
            SettingsError::Zero("--max-batch-requests")
        );
    }

    #[test]
    fn every_flag_reaches_its_setting_under_the_same_name() {
        let settings = resolved(
            Task::TextGeneration,
            &[
                "--max-batch-tokens",
                "100",
                "--max-batch-requests",
                "7",
                "--max-running-sequences",
                "3",
                "--max-sequence-tokens",
                "512",
                "--max-prefill-tokens",
                "256",
                "--max-audio-bytes",
                "1000",
                "--max-audio-seconds",
                "30",
                "--torch-threads",
                "2",
            ],
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(settings.batch.max_batch_tokens, 100);
        assert_eq!(settings.batch.max_batch_requests, 7);
        assert_eq!(settings.generation.max_running_sequences, 3);
        assert_eq!(settings.generation.max_sequence_tokens, 512);
        assert_eq!(settings.generation.max_prefill_tokens, 256);
        assert_eq!(settings.audio.max_audio_bytes, 1000);
        assert_eq!(settings.audio.max_audio_seconds, 30);
        assert_eq!(settings.torch_threads, Some(2));
    }
}
