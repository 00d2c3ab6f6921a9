//! `infergate-runtime`: serves one model for one task over HTTP.

use std::path::PathBuf;

use clap::Parser;
use runtime::app::Runtime;
use runtime::settings::{Args, Command, Settings};

fn download(url: String, sha256: Option<String>, dest: PathBuf) -> anyhow::Result<()> {
    let download = runtime::download::Download { url, sha256, dest };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(download.run())?;
    Ok(())
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
        (Some(Command::Download { url, sha256, dest }), _, _) => {
            return download(url, sha256, dest);
        }
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
