//! The command line: `serve`, `logs export`, `keys`, `check`, `data`, `train`, `eval`, and the
//! flywheel controls of a running gateway (`run`, `runs`, `rollout`).

mod customize;
mod remote;
mod serve;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::store::traffic::{export_jsonl, ExportFilter};

#[derive(Parser, Debug)]
#[command(
    name = "flywheel",
    version,
    about = "A self-improving OpenAI-compatible inference gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = "config/flywheel.toml")]
        config: PathBuf,
        /// Overrides the config's listen address.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides the config's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// The traffic log.
    Logs {
        #[command(subcommand)]
        command: LogsCommand,
    },
    /// API keys for the config.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Check a config file and print what it defines.
    Check {
        #[arg(long, default_value = "config/flywheel.toml")]
        config: PathBuf,
    },
    /// Tool-calling datasets: import and split.
    Data {
        #[command(subcommand)]
        command: customize::DataCommand,
    },
    /// Train a LoRA adapter on a local base model.
    Train(customize::TrainArgs),
    /// Score a base model (or base + adapter) on a test set.
    Eval(customize::EvalArgs),
    /// Start a flywheel run for a route on a running gateway.
    Run(remote::RunArgs),
    /// Flywheel runs on a running gateway: the list, or one in full.
    Runs(remote::RunsArgs),
    /// A route's rollout on a running gateway: status, promote, rollback, pause, resume, approve,
    /// reject.
    Rollout {
        #[command(subcommand)]
        command: remote::RolloutCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum LogsCommand {
    /// Write the log as JSONL in the NVIDIA Data Flywheel record schema plus Flywheel's fields.
    Export {
        #[arg(long, default_value = "config/flywheel.toml")]
        config: PathBuf,
        /// Output file; standard output if absent.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        window: TrafficWindow,
        /// Include shadow requests.
        #[arg(long)]
        include_shadow: bool,
    },
}

/// Which logged requests a command reads.
#[derive(clap::Args, Debug)]
pub struct TrafficWindow {
    #[arg(long)]
    pub workload_id: Option<String>,
    #[arg(long)]
    pub route: Option<String>,
    /// Only records at or after this time (Unix milliseconds).
    #[arg(long)]
    pub since_ms: Option<i64>,
    /// Only records before this time (Unix milliseconds).
    #[arg(long)]
    pub until_ms: Option<i64>,
}

impl TrafficWindow {
    pub fn filter(self, include_shadow: bool) -> ExportFilter {
        ExportFilter {
            workload_id: self.workload_id,
            route: self.route,
            since_ms: self.since_ms,
            until_ms: self.until_ms,
            include_shadow,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Print the SHA-256 to put in `[[auth.keys]]` for a key read from standard input.
    Hash,
    /// Make a new random key and print it with its SHA-256.
    New,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cli: Cli) -> ExitCode {
    init_tracing();
    let result = match cli.command {
        Command::Serve {
            config,
            listen,
            data_dir,
        } => serve::run(&config, listen, data_dir),
        Command::Logs {
            command:
                LogsCommand::Export {
                    config,
                    out,
                    window,
                    include_shadow,
                },
        } => export(&config, out, window.filter(include_shadow)),
        Command::Keys { command } => keys(command),
        Command::Check { config } => check(&config),
        Command::Data { command } => customize::data(command),
        Command::Train(a) => customize::train_command(a),
        Command::Eval(a) => customize::eval_command(a),
        Command::Run(a) => remote::run_command(a),
        Command::Runs(a) => remote::runs_command(a),
        Command::Rollout { command } => remote::rollout_command(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flywheel: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn export(
    config: &std::path::Path,
    out: Option<PathBuf>,
    filter: ExportFilter,
) -> anyhow::Result<()> {
    let config = Config::load(config)?;
    let store = crate::store::ToolConn::open(&config)?;
    let conn = &store.conn;
    let n = match out {
        Some(path) => {
            let tmp = path.with_extension("jsonl.partial");
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            let n = export_jsonl(conn, &filter, &mut w)?;
            w.flush()?;
            drop(w);
            std::fs::rename(&tmp, &path)?;
            n
        }
        None => {
            let stdout = std::io::stdout();
            let mut w = std::io::BufWriter::new(stdout.lock());
            let n = export_jsonl(conn, &filter, &mut w)?;
            w.flush()?;
            n
        }
    };
    tracing::info!(records = n, "exported");
    Ok(())
}

fn keys(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Hash => {
            let mut key = String::new();
            std::io::stdin().read_line(&mut key)?;
            println!("{}", crate::api::auth::hash_key(key.trim()));
        }
        KeysCommand::New => {
            let bytes: [u8; 24] = rand::random();
            let key = format!(
                "fw-{}",
                bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            println!("key    = {key}");
            println!("sha256 = {}", crate::api::auth::hash_key(&key));
        }
    }
    Ok(())
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    println!("config {} is valid", path.display());
    println!("listen   {}", config.listen);
    println!("data_dir {}", config.data_dir.display());
    match config.store.postgres_url()? {
        Some(url) => println!("store    {}", crate::store::postgres::redact(&url)),
        None => println!("store    {} (SQLite)", config.db_path().display()),
    }
    println!("cpu      {}", crate::ops::cpu::features().describe());
    for u in &config.upstreams {
        println!("upstream {} -> {}", u.name, u.base_url);
        let pushed_to = config
            .routes
            .iter()
            .any(|r| r.flywheel.as_ref().and_then(|f| f.deploy.as_ref()) == Some(&u.name));
        if pushed_to {
            println!(
                "         adapters loaded on {}",
                u.lora_endpoints().join(", ")
            );
        }
    }
    for m in &config.models {
        println!("model    {} -> {}", m.name, m.path.display());
    }
    for r in &config.routes {
        println!("route    {} -> champion {}", r.name, r.rollout.champion);
        if let (Some(fw), Some(teacher)) = (&r.flywheel, r.teacher()) {
            println!(
                "         flywheel: student {} learns from teacher {} (schedule '{}')",
                fw.student, teacher, config.flywheel.schedule
            );
            if let Some(up) = &fw.deploy {
                println!("         winners roll out on upstream {up}");
            }
        }
        if let Some(g) = &r.guardrails {
            println!(
                "         guardrails: {}",
                crate::rails::guardrails::canonical_id(g)
            );
        }
    }
    for c in &config.rails.configs {
        let data = c.load_data()?;
        let compiled = crate::rails::guardrails::compile(&c.id(), &data)?;
        let flows: Vec<&str> = compiled.rails.iter().map(|r| r.flow.as_str()).collect();
        println!("rails    {} -> {}", c.id(), flows.join("; "));
    }
    Ok(())
}
