//! `infergate-runtime`: serves one model for one task over HTTP.

use clap::Parser;
use runtime::app::Runtime;
use runtime::settings::{Args, Command, DownloadArgs, Settings};

/// Runs the init container's fetch. Its outcome, good or bad, is one line on stderr and in the
/// termination message; a failure exits 1 so that Kubernetes retries with back-off.
fn download(args: DownloadArgs) -> anyhow::Result<()> {
    let server = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome =
        download_request(&args).and_then(|request| server.block_on(weights::fetch(&request)));
    let line = match &outcome {
        Ok(fetched) => fetched.message(),
        Err(error) => format!("{}: {error}", error.reason()),
    };
    eprintln!("{line}");
    // Kubernetes mounts the file; outside it there is none to create (certainly not in /dev),
    // and the line went to stderr anyway.
    if let Ok(mut log) = std::fs::File::options()
        .write(true)
        .truncate(true)
        .open(&args.termination_log)
    {
        let _ = std::io::Write::write_all(&mut log, line.as_bytes());
    }
    match outcome {
        Ok(_) => Ok(()),
        Err(_) => std::process::exit(1),
    }
}

fn download_request(args: &DownloadArgs) -> Result<weights::Request, weights::FetchError> {
    let mut store = weights::store::StoreOptions {
        endpoint: args.endpoint.clone(),
        region: args.region.clone(),
        path_style: args.path_style,
        credentials_secret: args.credentials_secret.clone(),
        credentials: Vec::new(),
    };
    if let Some(dir) = &args.credentials_dir {
        store.read_credentials(dir)?;
    }
    Ok(weights::Request {
        source: args.source.parse()?,
        dest: args.dest.clone(),
        sha256: args.sha256.clone(),
        store,
        cache: args
            .cache
            .as_ref()
            .map(|root| weights::cache::NodeCache::new(root, args.cache_max_bytes)),
        transfer: weights::store::Transfer {
            concurrency: args.concurrency,
            chunk_bytes: args.chunk_bytes,
            ..weights::store::Transfer::default()
        },
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
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
    let (task, model_dir) = match (args.command.take(), args.task, args.model_dir.take()) {
        (Some(Command::Download(args)), _, _) => return download(*args),
        (Some(Command::RenderTemplates), _, _) => {
            return Ok(runtime::generate::sandbox::serve_renders()?);
        }
        (None, Some(task), Some(model_dir)) => (task, model_dir),
        (None, _, _) => unreachable!("clap requires --task and --model-dir without a subcommand"),
    };
    let settings = Settings::resolve(args, task, model_dir, runtime::device::inference_device())?;
    if let Some(threads) = settings.torch_threads {
        tch::set_num_threads(threads);
    }
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
                Ok(Ok(Err(error))) => Err(anyhow::anyhow!("loading the model failed: {error}")),
                _ => Err(anyhow::anyhow!("the model thread stopped")),
            },
        }
    })
}
