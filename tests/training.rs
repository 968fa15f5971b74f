//! LoRA training end to end on a tiny random model: a synthetic tool-calling task is rendered with
//! the serving prompt format, trained on, saved as a PEFT adapter, hot-loaded into the serving
//! engine and scored through the local backend on held-out items. Also: a killed job resumes from
//! its checkpoint to the same result.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use flywheel::backend::local::LocalBackend;
use flywheel::engine::chat::ChatFormat;
use flywheel::engine::testing::{
    write_tiny_llama, write_tiny_llama_with_template, TINY_TOOLS_TEMPLATE,
};
use flywheel::engine::{Engine, LocalModelConfig};
use flywheel::flywheel::dataset::{self, Record};
use flywheel::flywheel::eval;
use flywheel::flywheel::train::model::TrainBase;
use flywheel::flywheel::train::{self, Hyperparameters, TrainError};
use serde_json::{json, Value};

fn tools() -> Vec<Value> {
    let tool = |name: &str, what: &str, arg: &str| {
        json!({"type": "function", "function": {"name": name, "description": what,
            "parameters": {"type": "object", "properties": {arg: {"type": "integer"}}, "required": [arg]}}})
    };
    vec![
        tool("set_volume", "Set the speaker volume", "level"),
        tool("set_timer", "Start a countdown", "minutes"),
    ]
}

/// Every pairing of the ten digits with 12 phrasings (6 per tool): 120 queries, each calling one
/// tool with the query's number. Held out are whole queries, pairings of a phrasing and a number
/// the model never saw together, so a right answer needs the phrasing → tool mapping and the number
/// copied from the query into the arguments, not a memorised query. Every phrasing ends with its
/// number: a 2-layer random model learns to copy from a fixed distance back reliably, where a
/// number in mid-sentence made held-out argument accuracy swing between 0.1 and 1.0 with the
/// training seed (and with the last bit of a kernel's rounding).
fn task() -> Vec<Record> {
    let phrasings = [
        ("set_volume", "level", "volume {}"),
        ("set_timer", "minutes", "timer {}"),
        ("set_volume", "level", "set the volume to {}"),
        ("set_timer", "minutes", "wake me in minutes: {}"),
        ("set_volume", "level", "turn the sound to {}"),
        ("set_timer", "minutes", "remind me after a count of {}"),
        ("set_volume", "level", "make it loud, level {}"),
        ("set_timer", "minutes", "countdown of {}"),
        ("set_volume", "level", "speaker at {}"),
        ("set_timer", "minutes", "a minute timer of {}"),
        ("set_volume", "level", "the volume dial on {}"),
        ("set_timer", "minutes", "ring after minutes: {}"),
    ];
    let mut out = Vec::new();
    for n in 0..10u32 {
        for (tool, arg, q) in phrasings {
            out.push(Record {
                messages: vec![
                    json!({"role": "user", "content": q.replace("{}", &n.to_string())}),
                    json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                        "function": {"name": tool, "arguments": json!({arg: n}).to_string()}}]}),
                ],
                tools: tools(),
                tool_choice: None,
                ground_truth: None,
            });
        }
    }
    out
}

fn engine(path: &std::path::Path) -> Arc<Engine> {
    let cfg: LocalModelConfig = serde_json::from_value(json!({
        "name": "tiny", "path": path, "weights": "f32", "context_length": 2048, "max_batch": 8
    }))
    .unwrap();
    Engine::load(&cfg).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_training_teaches_a_random_model_held_out_tool_calls() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    // A template with its own compact tool syntax keeps prompts short enough for a 2-layer model
    // to find the number in; training and serving both render through it.
    write_tiny_llama_with_template(&model, GgmlDType::F32, 17, TINY_TOOLS_TEMPLATE);
    let records = task();
    let splits = dataset::split(&records, 0.0, 0.25, 3);
    assert_eq!(splits.test.len(), 30);
    assert_eq!(splits.train.len(), 90);
    let chat = ChatFormat::load(&model).unwrap();
    let train_ex = dataset::training_examples(&chat, &splits.train).unwrap();
    let base = TrainBase::load(&model, 2048).unwrap();
    let hp = Hyperparameters {
        epochs: 100,
        batch_size: 6,
        micro_batch_size: 6,
        learning_rate: 1e-2,
        adapter_dim: 8,
        warmup_ratio: 0.05,
        weight_decay: 0.0,
        max_seq_len: 2048,
        ..Hyperparameters::default()
    };
    let mut losses = Vec::new();
    let out = train::train(
        &base,
        &train_ex,
        &[],
        &hp,
        None,
        &AtomicBool::new(false),
        &mut |p| losses.push(p.train_loss),
    )
    .unwrap();
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[losses.len() - 3..].iter().sum::<f64>() / 3.0;
    eprintln!("training loss {first} -> {last}");
    assert!(last < first * 0.2, "training loss {first} -> {last}");

    let adapter_dir = dir.path().join("adapters/task");
    out.lora
        .save_peft(&out.theta, &adapter_dir, "tiny", 0.0)
        .unwrap();
    let engine = engine(&model);
    engine.load_adapter("test/task", &adapter_dir).unwrap();
    let backend = LocalBackend::new(engine);
    let items: Vec<eval::EvalItem> = splits.test.iter().map(Record::eval_item).collect();
    let (_, before) = eval::run(&backend, "tiny", None, &items, 96, 4).await;
    let (results, after) = eval::run(&backend, "tiny", Some("test/task"), &items, 96, 4).await;
    let shown = results.iter().map(|r| &r.predicted).collect::<Vec<_>>();
    eprintln!("held-out tool calls before {before:?}\nafter {after:?}");
    assert!(
        before.function_name_accuracy < 0.2 && before.function_name_and_args_accuracy == 0.0,
        "the random base already scores {before:?}"
    );
    // Across 12 training seeds this scored 1.0 on names every time and 0.5–1.0 on arguments (ten
    // of them 0.9 or more). Runs that learned no copying (dropout on, or twice the learning
    // rate) scored 0–0.13 on arguments with names still right.
    assert!(
        after.function_name_accuracy >= 0.9 && after.function_name_and_args_accuracy >= 0.4,
        "after training: {after:?}\n{shown:?}"
    );
    assert!(after.json_parse_failure_rate <= 0.1, "{after:?}\n{shown:?}");
    assert_eq!(after.errors, 0);
}

#[test]
fn a_cancelled_job_resumes_from_its_checkpoint_to_the_same_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, GgmlDType::F32, 23);
    let chat = ChatFormat::load(&model).unwrap();
    let records = task();
    let ex = dataset::training_examples(&chat, &records[..12]).unwrap();
    let val = dataset::training_examples(&chat, &records[12..16]).unwrap();
    let base = TrainBase::load(&model, 2048).unwrap();
    let hp = Hyperparameters {
        epochs: 2,
        batch_size: 4,
        micro_batch_size: 2,
        learning_rate: 1e-2,
        adapter_dim: 4,
        adapter_dropout: 0.1,
        max_seq_len: 2048,
        ..Hyperparameters::default()
    };
    let never = AtomicBool::new(false);
    let straight = train::train(&base, &ex, &val, &hp, None, &never, &mut |_| {}).unwrap();
    assert_eq!(straight.epochs.len(), 2);
    assert!(straight.epochs.iter().all(|e| e.val_loss.is_some()));

    // Cancel after the fourth step (mid second epoch), then run again from the checkpoint.
    let ckpt = dir.path().join("job.ckpt");
    let cancel = AtomicBool::new(false);
    let err = train::train(&base, &ex, &val, &hp, Some(&ckpt), &cancel, &mut |p| {
        if p.step == 4 {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    })
    .err()
    .unwrap();
    assert!(matches!(err, TrainError::Cancelled));
    assert!(ckpt.exists());
    let mut steps_seen = Vec::new();
    let resumed = train::train(&base, &ex, &val, &hp, Some(&ckpt), &never, &mut |p| {
        steps_seen.push(p.step)
    })
    .unwrap();
    assert_eq!(steps_seen, vec![5, 6]);
    assert_eq!(resumed.best_epoch, straight.best_epoch);
    assert_eq!(resumed.epochs, straight.epochs);
    assert_eq!(resumed.theta, straight.theta);

    // Out-of-range settings are refused by name.
    let bad = Hyperparameters {
        learning_rate: 0.0,
        ..hp.clone()
    };
    let e = train::train(&base, &ex, &val, &bad, None, &never, &mut |_| {})
        .err()
        .unwrap();
    assert!(e.to_string().contains("learning_rate"), "{e}");
    let bad = Hyperparameters {
        target_modules: vec!["qkv".into()],
        ..hp
    };
    let e = train::train(&base, &ex, &val, &bad, None, &never, &mut |_| {})
        .err()
        .unwrap();
    assert!(e.to_string().contains("unknown module 'qkv'"), "{e}");
}
