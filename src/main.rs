use std::{io::IsTerminal, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use mull::{
    config::{LogFormat, ServeArgs},
    fetch,
};

/// An OpenAI-compatible inference server for quantized GGUF models.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configured models over HTTP (the default command).
    Serve(ServeArgs),
    /// Download and verify the default model, then exit.
    Fetch {
        /// Folder to store the model in.
        #[arg(long, env = "MULL_MODELS_DIR", default_value = "models")]
        models_dir: PathBuf,
    },
}

fn init_logging(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve(ServeArgs::default())) {
        Command::Fetch { models_dir } => {
            let target = models_dir.join(fetch::DEFAULT_MODEL_FILE);
            fetch::fetch_default_model(&target).context("fetching the default model")?;
            Ok(())
        }
        Command::Serve(args) => {
            let config = match args.resolve() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(2);
                }
            };
            init_logging(&config.log, config.log_format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(mull::serve::serve(config))
        }
    }
}
