//! `infergate`: the command line of infergate. `infergate up -f DIR` runs ModelDeployments and
//! AccessTokens on this machine (local mode); `infergate rotate-keys` replaces the key its proxy
//! signs forwarded requests with; `infergate token new` prints a fresh token and the digest to
//! put in an AccessToken's `spec.tokenHash`; `infergate token create | list | revoke | rotate`
//! manage AccessTokens in the cluster of the current kube context; `infergate snippet MODEL`
//! prints client code for a deployment. Installed on PATH as
//! `kubectl-infergate` (a link to this binary) it is also `kubectl infergate ...`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "infergate", version, about = "infergate's command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves the ModelDeployments and AccessTokens of YAML files on this machine, without a
    /// cluster: one runtime per model, the proxy in front, tokens printed once.
    Up {
        /// A YAML file, or a directory of them (the files one would `kubectl apply`).
        #[arg(short = 'f', long = "filename")]
        path: PathBuf,
        /// Where clients reach the proxy.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The proxy's Prometheus metrics listener.
        #[arg(long, default_value = "127.0.0.1:9090")]
        metrics_listen: SocketAddr,
        /// Issued tokens' digests, the proxy's config and logs; default `.infergate/` beside
        /// the files.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The runtime binary; default: next to this one, then PATH.
        #[arg(long, env = "INFERGATE_RUNTIME_BIN")]
        runtime_bin: Option<PathBuf>,
        /// The proxy binary; default: next to this one, then PATH.
        #[arg(long, env = "INFERGATE_PROXY_BIN")]
        proxy_bin: Option<PathBuf>,
        /// libtorch threads of each runtime.
        #[arg(long)]
        torch_threads: Option<usize>,
    },
    /// Replaces the internal signing key of a running `infergate up` now (it also does so
    /// daily): the proxy signs with the new key within seconds, and the old one verifies until
    /// the requests it signed are done.
    RotateKeys {
        /// The files `infergate up` was started with (its state directory is beside them).
        #[arg(short = 'f', long = "filename", required_unless_present = "state_dir")]
        path: Option<PathBuf>,
        /// The state directory, if `infergate up` was given one.
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Prints client code for a ModelDeployment: its task's endpoint and payload, ready to run
    /// with INFERGATE_TOKEN set. From the cluster of the current kube context, or with -f from
    /// the files `infergate up` serves.
    Snippet {
        /// The ModelDeployment's name.
        model: String,
        #[arg(long, value_enum, default_value = "python")]
        lang: operator::snippets::Language,
        /// Where clients reach the proxy; default: the address the operator publishes (in a
        /// cluster) or `infergate up` listens on (with -f).
        #[arg(long)]
        url: Option<String>,
        #[arg(short = 'n', long, conflicts_with = "path")]
        namespace: Option<String>,
        #[command(flatten)]
        local: Local,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Prints a new token (shown once) and its `sha256:` digest for `spec.tokenHash`.
    New,
    /// Creates an AccessToken for models of the namespace, waits until the proxy accepts it and
    /// prints its token once. The token is made here and only its digest is applied, so no
    /// plaintext is stored in the cluster (unless --keep-secret).
    Create {
        name: String,
        /// ModelDeployments of the namespace the token may call (`a,b`).
        #[arg(long, value_delimiter = ',', required = true)]
        models: Vec<String>,
        /// Lifetime from issue, e.g. `30d`, `24h`.
        #[arg(long, value_parser = operator::token_commands::parse_span, conflicts_with = "expires")]
        ttl: Option<Duration>,
        /// Expiry as an RFC 3339 time, e.g. `2027-01-01T00:00:00Z`.
        #[arg(long)]
        expires: Option<jiff::Timestamp>,
        /// Let the operator issue the token into a Secret of the same name, kept for workloads
        /// that mount it; the token is printed from there.
        #[arg(long)]
        keep_secret: bool,
        /// Requests per minute the token may make (all proxy replicas together).
        #[arg(long)]
        requests_per_minute: Option<u32>,
        /// Requests the token may have in progress at once.
        #[arg(long)]
        concurrent_requests: Option<u32>,
        /// Prompt and completion tokens of text generation per minute.
        #[arg(long)]
        tokens_per_minute: Option<u64>,
        #[arg(short = 'n', long, conflicts_with = "path")]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: operator::token_commands::Output,
        #[command(flatten)]
        local: Local,
    },
    /// Lists the AccessTokens of the namespace: phase, models, prefix, expiry, rotation.
    List {
        #[arg(short = 'n', long, conflicts_with = "path")]
        namespace: Option<String>,
        #[command(flatten)]
        local: Local,
    },
    /// Revokes an AccessToken: the proxy refuses its token within a second.
    Revoke {
        name: String,
        #[arg(short = 'n', long, conflicts_with = "path")]
        namespace: Option<String>,
        #[command(flatten)]
        local: Local,
    },
    /// Makes a successor for the same models (printed once) and keeps the old token valid for
    /// the grace period only, so clients move over without an outage.
    Rotate {
        name: String,
        /// How long the old token keeps working, e.g. `24h`.
        #[arg(long, value_parser = operator::token_commands::parse_span)]
        grace: Duration,
        #[arg(short = 'n', long, conflicts_with = "path")]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: operator::token_commands::Output,
        #[command(flatten)]
        local: Local,
    },
}

/// Local mode instead of the cluster: the files `infergate up` serves.
#[derive(Debug, clap::Args)]
struct Local {
    /// The files `infergate up -f` serves, instead of the cluster: token commands edit them (a
    /// running `infergate up` applies the change), `snippet` reads them.
    #[arg(short = 'f', long = "filename")]
    path: Option<PathBuf>,
    /// The state directory, if `infergate up` was given one.
    #[arg(long, requires = "path")]
    state_dir: Option<PathBuf>,
}

impl Local {
    /// The files and the state directory, when local mode is asked for.
    fn resolve(self) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
        let Some(path) = self.path else {
            return Ok(None);
        };
        let path = std::path::absolute(&path)?;
        let state_dir = self.state_dir.unwrap_or_else(|| default_state_dir(&path));
        Ok(Some((path, state_dir)))
    }
}

/// How long a local command waits for a running `infergate up` to apply its change.
const LOCAL_WAIT: Duration = Duration::from_secs(10);

/// `name` beside this executable (a cargo build or an unpacked release), else on PATH.
fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// `.infergate/` beside the files `infergate up -f` was given.
fn default_state_dir(path: &Path) -> PathBuf {
    let beside = if path.is_dir() {
        path.to_owned()
    } else {
        path.parent()
            .map_or_else(|| PathBuf::from("."), Path::to_owned)
    };
    beside.join(".infergate")
}

/// Asks the running `infergate up` for a rotation and waits until it is done.
fn rotate_keys(state_dir: &Path) -> anyhow::Result<()> {
    let keys_dir = operator::local::keys::dir(state_dir);
    anyhow::ensure!(
        keys_dir.is_dir(),
        "no internal keys in {}: is `infergate up` running there?",
        state_dir.display()
    );
    let request = operator::local::keys::request_rotation(state_dir)?;
    for _ in 0..100 {
        if !request.exists() {
            println!("rotated: the proxy signs with a new key within seconds");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_file(&request).ok();
    anyhow::bail!(
        "`infergate up` did not rotate within 10 s: is it running with state directory {}?",
        state_dir.display()
    )
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("error: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up {
            path,
            listen,
            metrics_listen,
            state_dir,
            runtime_bin,
            proxy_bin,
            torch_threads,
        } => {
            let path = std::path::absolute(&path)?;
            let options = operator::local::UpOptions {
                state_dir: state_dir.unwrap_or_else(|| default_state_dir(&path)),
                path,
                listen,
                metrics_listen,
                runtime_bin: runtime_bin.unwrap_or_else(|| sibling_binary("infergate-runtime")),
                proxy_bin: proxy_bin.unwrap_or_else(|| sibling_binary("infergate-proxy")),
                torch_threads,
                poll: Duration::from_millis(250),
            };
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(operator::local::up(options))?;
        }
        Command::RotateKeys { path, state_dir } => {
            let state_dir = match (state_dir, path) {
                (Some(state_dir), _) => state_dir,
                (None, Some(path)) => default_state_dir(&std::path::absolute(&path)?),
                (None, None) => unreachable!("clap requires one"),
            };
            rotate_keys(&state_dir)?;
        }
        Command::Token { command } => token(command)?,
        Command::Snippet {
            model,
            lang,
            url,
            namespace,
            local,
        } => {
            use operator::snippet_command::{cluster_target, local_target};
            let target = match local.resolve()? {
                Some((path, state_dir)) => local_target(&path, &state_dir, &model, url)?,
                None => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(async {
                        let (client, namespace) =
                            operator::token_commands::connect(namespace).await?;
                        cluster_target(&client, &namespace, &model, url).await
                    })?,
            };
            print!("{}", operator::snippets::render(&target, lang)?);
        }
    }
    Ok(())
}

fn token(command: TokenCommand) -> anyhow::Result<()> {
    use operator::token_commands::{self as commands, Expiry};
    let cluster = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        TokenCommand::Create {
            name,
            models,
            ttl,
            expires,
            keep_secret,
            requests_per_minute,
            concurrent_requests,
            tokens_per_minute,
            namespace,
            output,
            local,
        } => {
            let limits = crds::TokenLimits {
                requests_per_minute,
                concurrent_requests,
                tokens_per_minute,
            };
            let limits = (limits != crds::TokenLimits::default()).then_some(limits);
            let expiry = match (ttl, expires) {
                (Some(ttl), _) => Expiry::After(ttl),
                (None, Some(at)) => Expiry::At(at),
                (None, None) => Expiry::Never,
            };
            let issued = match local.resolve()? {
                Some((path, state_dir)) => {
                    anyhow::ensure!(
                        !keep_secret,
                        "--keep-secret has no use in local mode: the files hold the digest only"
                    );
                    operator::local::commands::create(
                        &path, &state_dir, &name, models, expiry, limits, LOCAL_WAIT,
                    )?
                }
                None => cluster.block_on(async {
                    let (client, namespace) = commands::connect(namespace).await?;
                    commands::create(
                        &client,
                        &namespace,
                        &name,
                        models,
                        expiry,
                        keep_secret,
                        limits,
                    )
                    .await
                })?,
            };
            print!("{}", issued.render(output));
        }
        TokenCommand::List { namespace, local } => {
            let table = match local.resolve()? {
                Some((path, state_dir)) => operator::local::commands::list(&path, &state_dir)?,
                None => cluster.block_on(async {
                    let (client, namespace) = commands::connect(namespace).await?;
                    commands::list(&client, &namespace).await
                })?,
            };
            print!("{table}");
        }
        TokenCommand::Revoke {
            name,
            namespace,
            local,
        } => match local.resolve()? {
            Some((path, _)) => {
                let file = operator::local::commands::revoke(&path, &name)?;
                println!(
                    "AccessToken {name} revoked in {}: a running `infergate up` refuses its token within a second",
                    file.display()
                );
            }
            None => {
                cluster.block_on(async {
                    let (client, namespace) = commands::connect(namespace).await?;
                    commands::revoke(&client, &namespace, &name).await
                })?;
                println!("accesstoken/{name} revoked: the proxy refuses its token");
            }
        },
        TokenCommand::Rotate {
            name,
            grace,
            namespace,
            output,
            local,
        } => {
            if let Some((path, state_dir)) = local.resolve()? {
                let (issued, until) =
                    operator::local::commands::rotate(&path, &state_dir, &name, grace, LOCAL_WAIT)?;
                print!("{}", issued.render(output));
                eprintln!(
                    "AccessToken {name} stays valid until {until}, then the proxy refuses it"
                );
                return Ok(());
            }
            let rotation = cluster.block_on(async {
                let (client, namespace) = commands::connect(namespace).await?;
                commands::rotate(&client, &namespace, &name, grace).await
            })?;
            print!("{}", rotation.issued.render(output));
            let until = rotation.old_expires_at.with_context(|| {
                format!(
                    "accesstoken/{} was not shortened to its grace period: it stays valid as before; revoke it or set its expiresAt by hand",
                    rotation.predecessor
                )
            })?;
            eprintln!(
                "accesstoken/{} stays valid until {until}, then the proxy refuses it",
                rotation.predecessor
            );
        }
        TokenCommand::New => {
            let token = crds::Token::generate()?;
            println!("token:     {}", token.expose_secret());
            println!("tokenHash: sha256:{}", token.sha256_hex());
            eprintln!(
                "The token is shown once; store it now. Only the tokenHash goes into the AccessToken."
            );
        }
    }
    Ok(())
}
