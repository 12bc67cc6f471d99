use std::{io::IsTerminal, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use candle_core::quantized::GgmlDType;
use mull::{
    bench::BenchArgs,
    config::{LogFormat, ServeArgs},
    fetch,
    speed::SpeedArgs,
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
        /// Format to serve it in: q8_0 (converted from the shipped Q4_1), q4_1 or q4_0.
        #[arg(long, env = "MULL_DEFAULT_FORMAT", default_value = "q8_0")]
        format: fetch::DefaultFormat,
    },
    /// Write a copy of a GGUF file with its Q4_1 tensors converted to another
    /// format (q8_0 or q4_0), which candle runs with vectorized kernels.
    Requantize {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        output: PathBuf,
        /// Target format: q8_0 or q4_0.
        #[arg(long, default_value = "q8_0")]
        to: String,
    },
    /// Measure prefill and decode speed of a model in-process; prints JSON.
    Speed(SpeedArgs),
    /// Load an OpenAI-compatible server at several concurrencies; prints JSON.
    Bench(BenchArgs),
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
        Command::Fetch { models_dir, format } => {
            fetch::ensure_default_model(&models_dir, format)
                .context("fetching the default model")?;
            Ok(())
        }
        Command::Requantize { input, output, to } => {
            let to = match to.as_str() {
                "q8_0" => GgmlDType::Q8_0,
                "q4_0" => GgmlDType::Q4_0,
                other => anyhow::bail!("--to must be q8_0 or q4_0, got `{other}`"),
            };
            fetch::requantize(&input, &output, GgmlDType::Q4_1, to)?;
            eprintln!("model: wrote {}", output.display());
            Ok(())
        }
        Command::Speed(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let report = runtime.block_on(mull::speed::run(args))?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Command::Bench(args) => {
            let output = args.output.clone();
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let report = runtime.block_on(mull::bench::run(args))?;
            let json = serde_json::to_string_pretty(&report)?;
            if let Some(path) = output {
                std::fs::write(&path, &json)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!("{json}");
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
