//! `flywheel data …`, `flywheel train` and `flywheel eval`: the customize and evaluate steps on
//! local files, without a running gateway.

use crate::flywheel::sources::{Source, Taught};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use serde_json::json;

use crate::backend::local::LocalBackend;
use crate::engine::chat::ChatFormat;
use crate::engine::{Engine, LocalModelConfig};
use crate::flywheel::dataset::{self, Record};
use crate::flywheel::eval;
use crate::flywheel::train::model::TrainBase;
use crate::flywheel::train::{self, Hyperparameters};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DataFormat {
    /// `{"messages": [...], "tools": [...]}` per line, the last message the answer.
    Openai,
    /// Salesforce xLAM function-calling rows (`query`, `tools`, `answers`).
    Xlam,
    /// Berkeley Function Calling Leaderboard questions (with `--answers` for possible answers).
    Bfcl,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Convert a dataset into validated OpenAI-format JSONL.
    Import {
        #[arg(long, value_enum)]
        format: DataFormat,
        #[arg(long)]
        input: PathBuf,
        /// BFCL possible-answer file for `--format bfcl`.
        #[arg(long)]
        answers: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a dataset from the traffic log: answered, unblocked tool-call records of a workload,
    /// route and time window, deduplicated and split.
    Curate {
        #[arg(long, default_value = "config/flywheel.toml")]
        config: PathBuf,
        #[command(flatten)]
        window: super::TrafficWindow,
        /// Keep plain (no tool call) answers too, for generic workloads.
        #[arg(long)]
        include_plain: bool,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value_t = 0.1)]
        validation: f64,
        #[arg(long, default_value_t = 0.2)]
        test: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Refuse to write a dataset smaller than this.
        #[arg(long, default_value_t = 20)]
        min_records: usize,
    },
    /// Deduplicate on the user query and write seeded, tool-stratified train/validation/test files.
    Split {
        #[arg(long)]
        input: PathBuf,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value_t = 0.1)]
        validation: f64,
        #[arg(long, default_value_t = 0.2)]
        test: f64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// The base model: a GGUF file or a Hugging Face directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Training records (OpenAI-format JSONL).
    #[arg(long)]
    pub train: PathBuf,
    #[arg(long)]
    pub validation: Option<PathBuf>,
    /// Where the PEFT adapter is written (replaced atomically when the job completes).
    #[arg(long)]
    pub output: PathBuf,
    /// Hyperparameters as a JSON object (NeMo names: epochs, batch_size, learning_rate,
    /// adapter_dim, adapter_dropout, ...); the flags below override it.
    #[arg(long)]
    pub hyperparameters: Option<PathBuf>,
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub adapter_dim: Option<usize>,
    /// The frozen base's products: auto (bf16 on AMX tiles where the CPU has them), f32, bf16.
    #[arg(long)]
    pub precision: Option<String>,
    /// Resume from and save to this checkpoint file.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory to evaluate on top of the base.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Test items (JSONL): records ending with the expected answer, or NeMo's test rows with
    /// `tool_calls` beside the messages.
    #[arg(long)]
    pub data: PathBuf,
    /// Per-item results and scores as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long, default_value_t = 4096)]
    pub context_length: usize,
    /// Another run's `--out` file on the same items: prints the paired difference (bootstrap 95%
    /// interval, McNemar's exact test) for each metric.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// How the base's projection weights are held: `q8_0` (as served), `f32` or `native`.
    #[arg(long, default_value = "q8_0")]
    pub weights: String,
    /// Bits per value of the adapter's factors on a `q8_0` base, as `adapter_bits` in the config:
    /// 4 (the default) or 8.
    #[arg(long, default_value_t = 4)]
    pub adapter_bits: u8,
}

fn read_records(path: &Path) -> anyhow::Result<Vec<Record>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    dataset::parse_openai_jsonl(&text).with_context(|| path.display().to_string())
}

fn write_records(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&r.to_json().to_string());
        text.push('\n');
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `train.jsonl`, `validation.jsonl` and `test.jsonl` in `dir`.
fn write_splits(dir: &Path, s: &dataset::Splits) -> anyhow::Result<()> {
    for (name, part) in [
        ("train", &s.train),
        ("validation", &s.validation),
        ("test", &s.test),
    ] {
        write_records(&dir.join(format!("{name}.jsonl")), part)?;
    }
    Ok(())
}

pub fn data(command: DataCommand) -> anyhow::Result<()> {
    match command {
        DataCommand::Import {
            format,
            input,
            answers,
            out,
        } => {
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let records = match format {
                DataFormat::Openai => dataset::parse_openai_jsonl(&text),
                DataFormat::Xlam => dataset::parse_xlam(&text),
                DataFormat::Bfcl => {
                    let a = match &answers {
                        Some(p) => Some(std::fs::read_to_string(p)?),
                        None => None,
                    };
                    dataset::parse_bfcl(&text, a.as_deref())
                }
            }
            .with_context(|| input.display().to_string())?;
            write_records(&out, &records)?;
            println!("{} records -> {}", records.len(), out.display());
        }
        DataCommand::Curate {
            config,
            window,
            include_plain,
            out_dir,
            validation,
            test,
            seed,
            min_records,
        } => {
            let config = crate::config::Config::load(&config)?;
            let store = crate::store::ToolConn::open(&config)?;
            let conn = &store.conn;
            let filter = window.filter(false);
            let taught: Vec<Taught> = crate::store::traffic::served_exchanges(conn, &filter, None)?
                .into_iter()
                .map(|exchange| Taught {
                    exchange,
                    source: Source::Logged,
                })
                .collect();
            let (s, report) = crate::flywheel::curate::curate(
                &taught,
                Default::default(),
                include_plain,
                (validation, test),
                seed,
                min_records,
            )
            .map_err(anyhow::Error::msg)?;
            write_splits(&out_dir, &s)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        DataCommand::Split {
            input,
            out_dir,
            validation,
            test,
            seed,
        } => {
            if !(0.0..1.0).contains(&(validation + test)) || validation < 0.0 || test < 0.0 {
                bail!("--validation and --test must be fractions summing to less than 1");
            }
            let records = dataset::dedup(read_records(&input)?);
            let s = dataset::split(&records, validation, test, seed);
            if s.train.is_empty() {
                bail!(
                    "the training split is empty: {} records after dedup",
                    records.len()
                );
            }
            write_splits(&out_dir, &s)?;
            println!(
                "{} records after dedup: train {}, validation {}, test {} -> {}",
                records.len(),
                s.train.len(),
                s.validation.len(),
                s.test.len(),
                out_dir.display()
            );
        }
    }
    Ok(())
}

pub fn train_command(a: TrainArgs) -> anyhow::Result<()> {
    let mut hp: Hyperparameters = match &a.hyperparameters {
        Some(p) => serde_json::from_str(&std::fs::read_to_string(p)?)
            .with_context(|| format!("{} is not a hyperparameter object", p.display()))?,
        None => Hyperparameters::default(),
    };
    hp.epochs = a.epochs.unwrap_or(hp.epochs);
    hp.batch_size = a.batch_size.unwrap_or(hp.batch_size);
    hp.learning_rate = a.learning_rate.unwrap_or(hp.learning_rate);
    hp.adapter_dim = a.adapter_dim.unwrap_or(hp.adapter_dim);
    if let Some(p) = &a.precision {
        hp.precision = crate::flywheel::train::Precision::parse(p)
            .ok_or_else(|| anyhow::anyhow!("--precision '{p}' is not one of auto, f32, bf16"))?;
    }
    hp.validate()?;
    let chat = ChatFormat::load(&a.model).map_err(anyhow::Error::msg)?;
    let train_ex = dataset::training_examples(&chat, &read_records(&a.train)?)?;
    let val_ex = match &a.validation {
        Some(p) => dataset::training_examples(&chat, &read_records(p)?)?,
        None => Vec::new(),
    };
    let base = TrainBase::load_with(&a.model, hp.max_seq_len, hp.precision)?;
    let tokens: usize = train_ex.iter().map(|e| e.tokens.len()).sum();
    println!(
        "training rank-{} LoRA on {} examples ({} tokens), {} validation, {} epochs",
        hp.adapter_dim,
        train_ex.len(),
        tokens,
        val_ex.len(),
        hp.epochs
    );
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  {msg}  elapsed {elapsed_precise}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let out = train::train(
        &base,
        &train_ex,
        &val_ex,
        &hp,
        a.checkpoint.as_deref(),
        &AtomicBool::new(false),
        &mut |p| {
            if bar.is_hidden() && (p.step % 10 == 0 || p.step == p.total_steps) {
                println!(
                    "step {}/{}  epoch {}/{}  loss {:.4}  {:.0} tok/s  eta {:.0}s",
                    p.step,
                    p.total_steps,
                    p.epoch + 1,
                    p.epochs,
                    p.train_loss,
                    p.tokens_per_sec,
                    p.eta_secs
                );
            }
            bar.set_length(p.total_steps as u64);
            bar.set_position(p.step as u64);
            bar.set_message(format!(
                "epoch {}/{}  loss {:.4}  val {}  {:.0} tok/s  eta {:.0}s",
                p.epoch + 1,
                p.epochs,
                p.train_loss,
                p.val_loss.map_or("-".into(), |v| format!("{v:.4}")),
                p.tokens_per_sec,
                p.eta_secs
            ));
        },
    )?;
    bar.finish();
    let base_name = a
        .model
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("base");
    out.lora
        .save_peft(&out.theta, &a.output, base_name, hp.adapter_dropout)?;
    for e in &out.epochs {
        println!(
            "epoch {}: train loss {:.4}, validation loss {}",
            e.epoch + 1,
            e.train_loss,
            e.val_loss.map_or("-".into(), |v| format!("{v:.4}"))
        );
    }
    println!(
        "best epoch {}; {:.1} tokens/s; adapter -> {}",
        out.best_epoch + 1,
        out.tokens_per_sec,
        a.output.display()
    );
    Ok(())
}

pub fn eval_command(a: EvalArgs) -> anyhow::Result<()> {
    // The same test formats the evaluation jobs accept: records ending with the answer, or rows
    // with the expected `tool_calls` beside the messages.
    let text = std::fs::read_to_string(&a.data)
        .with_context(|| format!("reading {}", a.data.display()))?;
    let mut items =
        dataset::parse_eval_items(&text).with_context(|| a.data.display().to_string())?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    let cfg: LocalModelConfig = serde_json::from_value(json!({
        "name": "eval-base",
        "path": a.model,
        "weights": a.weights,
        "context_length": a.context_length,
        "adapter_bits": a.adapter_bits,
    }))
    .map_err(|e| anyhow::anyhow!("--weights or --adapter-bits: {e}"))?;
    let engine: Arc<Engine> = Engine::load(&cfg)?;
    let adapter = match &a.adapter {
        Some(dir) => {
            engine.load_adapter("eval/candidate", dir)?;
            Some("eval/candidate")
        }
        None => None,
    };
    let backend = LocalBackend::new(engine);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (results, scores) = rt.block_on(eval::run(
        &backend,
        "eval-base",
        adapter,
        &items,
        a.max_tokens,
        4,
    ));
    println!("{}", serde_json::to_string_pretty(&scores)?);
    if let Some(path) = &a.baseline {
        let base: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)
            .with_context(|| format!("{} is not an eval results file", path.display()))?;
        let items = base["items"].as_array().cloned().unwrap_or_default();
        if items.len() != results.len() {
            bail!(
                "{} scored {} items, this run {}: compare runs on the same test set",
                path.display(),
                items.len(),
                results.len()
            );
        }
        for (metric, key) in [
            ("function_name_accuracy", "name_match"),
            ("function_name_and_args_accuracy", "name_and_args_match"),
            ("ast_accuracy", "ast_match"),
        ] {
            let a: Vec<bool> = items
                .iter()
                .map(|i| i[key].as_bool() == Some(true))
                .collect();
            let b: Vec<bool> = results
                .iter()
                .map(|r| match key {
                    "name_match" => r.name_match,
                    "ast_match" => r.ast_match,
                    _ => r.name_and_args_match,
                })
                .collect();
            let c = eval::compare_paired(&a, &b, 7);
            println!(
                "{metric}: baseline {:.3} -> {:.3}, difference {:+.3} (95% CI {:+.3} .. {:+.3}), McNemar p = {:.2e} ({} improved, {} regressed)",
                c.a, c.b, c.difference, c.ci_low, c.ci_high, c.mcnemar_p, c.only_b, c.only_a
            );
        }
    }
    if let Some(out) = &a.out {
        std::fs::write(
            out,
            serde_json::to_string_pretty(&json!({"scores": scores, "items": results}))?,
        )?;
    }
    Ok(())
}
