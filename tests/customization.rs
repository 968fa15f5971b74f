//! The NeMo-shaped customization API over real HTTP on a tiny model: namespaces, datasets with
//! file upload, a customization job in the tutorial's body shape run to completion, its adapter
//! served at once by name, and the bad inputs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use flywheel::engine::testing::write_tiny_llama;
use serde_json::{json, Value};

fn record(tool: &str, city: &str) -> Value {
    json!({
        "messages": [
            {"role": "user", "content": format!("{} {city}", if tool == "get_weather" { "weather in" } else { "time in" })},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                "function": {"name": tool, "arguments": {"city": city}}}]}
        ],
        "tools": [
            {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
            {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
        ]
    })
}

fn jsonl(rows: &[Value]) -> String {
    rows.iter().map(|r| format!("{r}\n")).collect()
}

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, url);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customization_job_trains_registers_and_serves_its_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, candle_core::quantized::GgmlDType::F32, 31);
    let config = format!(
        "[[models]]\nname = \"tiny\"\npath = \"{}\"\ncontext_length = 2048\n",
        path_str(&model)
    );
    let gw = GatewayProcess::start(&config);
    use reqwest::Method;

    let (st, ns) = call(
        Method::POST,
        gw.url("/v1/namespaces"),
        Some(json!({"id": "team"})),
    )
    .await;
    assert_eq!(st, 201, "{ns}");
    let (st, _) = call(
        Method::POST,
        gw.url("/v1/namespaces"),
        Some(json!({"id": "team"})),
    )
    .await;
    assert_eq!(st, 409);
    let (st, list) = call(Method::GET, gw.url("/v1/namespaces"), None).await;
    assert_eq!((st, list["data"][0]["id"].as_str()), (200, Some("team")));

    let (st, ds) = call(
        Method::POST,
        gw.url("/v1/datasets"),
        Some(json!({"name": "tools", "namespace": "team", "description": "tool calls"})),
    )
    .await;
    assert_eq!(st, 201, "{ds}");
    assert_eq!(ds["files_url"], "hf://datasets/team/tools");
    let (st, _) = call(
        Method::POST,
        gw.url("/v1/datasets"),
        Some(json!({"name": "x", "namespace": "nobody"})),
    )
    .await;
    assert_eq!(st, 404);

    // Upload: a malformed row is refused with its row number, a good file is stored.
    let rows: Vec<Value> = ["paris", "oslo", "rome", "lima"]
        .iter()
        .flat_map(|c| [record("get_weather", c), record("get_time", c)])
        .collect();
    let client = reqwest::Client::new();
    let bad = format!("{}{{\"messages\": []}}\n", jsonl(&rows[..2]));
    let r = client
        .put(gw.url("/v1/datasets/team/tools/files/training/bad.jsonl"))
        .body(bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let msg = r.json::<Value>().await.unwrap()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("row 3"), "{msg}");
    let r = client
        .put(gw.url("/v1/datasets/team/tools/files/../escape.jsonl"))
        .body(jsonl(&rows))
        .send()
        .await
        .unwrap();
    assert!(matches!(r.status().as_u16(), 400 | 404), "{}", r.status());
    for (path, part) in [
        ("training/data.jsonl", &rows[..6]),
        ("validation/data.jsonl", &rows[6..]),
    ] {
        let r = client
            .put(gw.url(&format!("/v1/datasets/team/tools/files/{path}")))
            .body(jsonl(part))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let (_, ds) = call(Method::GET, gw.url("/v1/datasets/team/tools"), None).await;
    assert_eq!(ds["files"].as_array().unwrap().len(), 2, "{ds}");
    let back = client
        .get(gw.url("/v1/datasets/team/tools/files/training/data.jsonl"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(back, jsonl(&rows[..6]));
    let r = client
        .get(gw.url("/v1/datasets/team/tools/files/training/none.jsonl"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // Bad jobs: unknown base, unknown dataset, out-of-range and unsupported hyperparameters.
    let job = |cfg: &str, ds: &str, hp: Value| {
        json!({"name": "tool-lora", "output_model": "team/tool-lora@v1", "config": cfg,
            "dataset": {"name": ds, "namespace": "team"}, "hyperparameters": hp})
    };
    let good_hp = json!({"training_type": "sft", "finetuning_type": "lora", "epochs": 2,
        "batch_size": 4, "learning_rate": 0.01, "lora": {"adapter_dim": 4, "adapter_dropout": 0.0}});
    for (body, needle) in [
        (
            job(
                "meta/llama-3.2-1b-instruct@v1.0.0+A100",
                "tools",
                good_hp.clone(),
            ),
            "names no local base",
        ),
        (job("tiny", "missing", good_hp.clone()), "does not exist"),
        (job("tiny", "tools", json!({"epochs": 0})), "epochs"),
        (
            job("tiny", "tools", json!({"finetuning_type": "all_weights"})),
            "finetuning_type",
        ),
        (
            job("tiny", "tools", json!({"lora": {"adapter_dropout": 1.5}})),
            "adapter_dropout",
        ),
    ] {
        let (st, v) = call(Method::POST, gw.url("/v1/customization/jobs"), Some(body)).await;
        assert!(matches!(st, 400 | 404), "{st} {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(needle), "{m}");
    }

    let (st, created) = call(
        Method::POST,
        gw.url("/v1/customization/jobs"),
        Some(job("tiny", "tools", good_hp)),
    )
    .await;
    assert_eq!(st, 200, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("cust-"));
    assert_eq!(created["output_model"], "team/tool-lora");
    assert_eq!(created["hyperparameters"]["lora"]["adapter_dim"], 4);

    let t = Instant::now();
    let status = loop {
        let (st, s) = call(
            Method::GET,
            gw.url(&format!("/v1/customization/jobs/{id}/status")),
            None,
        )
        .await;
        assert_eq!(st, 200, "{s}");
        if matches!(
            s["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        ) {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "job still {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["percentage_done"], 100.0);
    assert_eq!(status["epochs_completed"], 2);
    assert_eq!(status["steps_completed"], 4);
    let losses = status["metrics"]["train_loss"].as_array().unwrap();
    assert_eq!(losses.len(), 4);
    assert!(status["metrics"]["val_loss"][1]["value"].as_f64().unwrap() > 0.0);

    // Servable at once, by its output_model name, and listed.
    let (_, models) = call(Method::GET, gw.url("/v1/models"), None).await;
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "team/tool-lora"),
        "{models}"
    );
    // The bare base is a model name too, though no route names it.
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "tiny"),
        "{models}"
    );
    let (st, reply) = call(
        Method::POST,
        gw.url("/v1/chat/completions"),
        Some(json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})),
    )
    .await;
    assert_eq!(st, 200, "{reply}");
    let (st, reply) = call(
        Method::POST,
        gw.url("/v1/chat/completions"),
        Some(json!({"model": "team/tool-lora", "messages": [{"role": "user", "content": "weather in oslo"}],
            "max_tokens": 8, "temperature": 0})),
    )
    .await;
    assert_eq!(st, 200, "{reply}");
    assert!(gw
        .dir
        .path()
        .join("data/adapters/team/tool-lora/adapter_model.safetensors")
        .exists());

    // A finished job cannot be cancelled; unknown jobs are 404; the job lists.
    let (st, _) = call(
        Method::POST,
        gw.url(&format!("/v1/customization/jobs/{id}/cancel")),
        None,
    )
    .await;
    assert_eq!(st, 409);
    let (st, _) = call(
        Method::GET,
        gw.url("/v1/customization/jobs/cust-nope"),
        None,
    )
    .await;
    assert_eq!(st, 404);
    let (_, jobs) = call(Method::GET, gw.url("/v1/customization/jobs"), None).await;
    assert_eq!(jobs["data"].as_array().unwrap().len(), 1);

    // A running job stops on request and says so.
    let long_hp =
        json!({"epochs": 500, "batch_size": 2, "learning_rate": 0.001, "lora": {"adapter_dim": 2}});
    let (st, long) = call(
        Method::POST,
        gw.url("/v1/customization/jobs"),
        Some(
            json!({"name": "long", "output_model": "team/long", "config": "tiny",
            "dataset": {"name": "tools", "namespace": "team"}, "hyperparameters": long_hp}),
        ),
    )
    .await;
    assert_eq!(st, 200, "{long}");
    let lid = long["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let (_, s) = call(
            Method::GET,
            gw.url(&format!("/v1/customization/jobs/{lid}/status")),
            None,
        )
        .await;
        if s["steps_completed"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _) = call(
        Method::POST,
        gw.url(&format!("/v1/customization/jobs/{lid}/cancel")),
        None,
    )
    .await;
    assert_eq!(st, 200);
    let t = Instant::now();
    loop {
        let (_, s) = call(
            Method::GET,
            gw.url(&format!("/v1/customization/jobs/{lid}")),
            None,
        )
        .await;
        if s["status"] == "cancelled" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, _) = call(Method::GET, gw.url("/v1/models/team/long"), None).await;
    assert_eq!(st, 404, "a cancelled job registers no adapter");

    // Evaluation in NeMo Evaluator's shape: the tutorial's test rows (expected calls beside the
    // messages), a custom chat-completion task with a tool-calling metric, the adapter as target.
    let test_rows: Vec<Value> = ["paris", "oslo"]
        .iter()
        .map(|c| {
            let mut r = record("get_weather", c);
            let answer = r["messages"].as_array_mut().unwrap().pop().unwrap();
            r["tool_calls"] = answer["tool_calls"].clone();
            r
        })
        .collect();
    let r = client
        .put(gw.url("/v1/datasets/team/tools/files/testing/test.jsonl"))
        .body(jsonl(&test_rows))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let eval_body = |url: &str, model: &str| {
        json!({
            "config": {"type": "custom", "tasks": {"custom-tool-calling": {
                "type": "chat-completion",
                "dataset": {"files_url": url, "limit": 50},
                "params": {"template": {"messages": "{{ item.messages | tojson }}", "tools": "{{ item.tools | tojson }}", "tool_choice": "auto"}},
                "metrics": {"tool-calling-accuracy": {"type": "tool-calling",
                    "params": {"tool_calls_ground_truth": "{{ item.tool_calls | tojson }}"}}}
            }}},
            "target": {"type": "model", "model": {"api_endpoint": {"url": "http://unused/v1/chat/completions", "model_id": model}}}
        })
    };
    let (st, v) = call(
        Method::POST,
        gw.url("/v1/evaluation/jobs"),
        Some(eval_body(
            "hf://datasets/team/tools/testing/test.jsonl",
            "no-such-model",
        )),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let (st, v) = call(
        Method::POST,
        gw.url("/v1/evaluation/jobs"),
        Some(eval_body(
            "hf://datasets/team/tools/../../etc",
            "team/tool-lora",
        )),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    let (st, ej) = call(
        Method::POST,
        gw.url("/v1/evaluation/jobs"),
        Some(eval_body(
            "hf://datasets/team/tools/testing/test.jsonl",
            "team/tool-lora",
        )),
    )
    .await;
    assert_eq!(st, 200, "{ej}");
    let eid = ej["id"].as_str().unwrap().to_string();
    let t = Instant::now();
    loop {
        let (_, j) = call(
            Method::GET,
            gw.url(&format!("/v1/evaluation/jobs/{eid}")),
            None,
        )
        .await;
        if j["status"] == "completed" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, res) = call(
        Method::GET,
        gw.url(&format!("/v1/evaluation/jobs/{eid}/results")),
        None,
    )
    .await;
    assert_eq!(st, 200, "{res}");
    let scores = &res["tasks"]["custom-tool-calling"]["metrics"]["tool-calling-accuracy"]["scores"];
    for s in [
        "function_name_accuracy",
        "function_name_and_args_accuracy",
        "ast_accuracy",
    ] {
        let v = scores[s]["value"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{s}: {res}");
        assert_eq!(scores[s]["stats"]["count"], 2);
    }
    assert!(gw
        .dir
        .path()
        .join(format!("data/jobs/{eid}/items.json"))
        .exists());

    // An evaluation the gateway was running when it stopped runs again after the restart (here
    // simulated by marking the finished job running again while the gateway is down).
    let mut gw = gw;
    assert!(gw.stop().success());
    gw.db()
        .execute(
            "UPDATE jobs SET status = 'running', result = NULL WHERE id = ?1",
            [&eid],
        )
        .unwrap();
    let gw = gw.restart();
    let t = Instant::now();
    loop {
        let (_, j) = call(
            Method::GET,
            gw.url(&format!("/v1/evaluation/jobs/{eid}")),
            None,
        )
        .await;
        if j["status"] == "completed" {
            break;
        }
        assert_eq!(j["status"], "running", "{j}");
        assert!(t.elapsed() < Duration::from_secs(120), "{j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, again) = call(
        Method::GET,
        gw.url(&format!("/v1/evaluation/jobs/{eid}/results")),
        None,
    )
    .await;
    assert_eq!(st, 200, "{again}");
    let again_scores =
        &again["tasks"]["custom-tool-calling"]["metrics"]["tool-calling-accuracy"]["scores"];
    for s in ["function_name_accuracy", "function_name_and_args_accuracy"] {
        // Greedy decoding: the rerun scores the same items the same way.
        assert_eq!(again_scores[s], scores[s], "{s}: {again}");
    }

    let (st, _) = call(Method::DELETE, gw.url("/v1/datasets/team/tools"), None).await;
    assert_eq!(st, 200);
    assert!(!gw.dir.path().join("data/datasets/team/tools").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_running_when_the_gateway_stops_resumes_after_the_restart() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, candle_core::quantized::GgmlDType::F32, 37);
    let config = format!(
        "[[models]]\nname = \"tiny\"\npath = \"{}\"\ncontext_length = 2048\n",
        path_str(&model)
    );
    let gw = GatewayProcess::start(&config);
    call(
        Method::POST,
        gw.url("/v1/namespaces"),
        Some(json!({"id": "team"})),
    )
    .await;
    call(
        Method::POST,
        gw.url("/v1/datasets"),
        Some(json!({"name": "d", "namespace": "team"})),
    )
    .await;
    let rows: Vec<Value> = ["paris", "oslo"]
        .iter()
        .map(|c| record("get_time", c))
        .collect();
    let r = reqwest::Client::new()
        .put(gw.url("/v1/datasets/team/d/files/training/a.jsonl"))
        .body(jsonl(&rows))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let (st, job) = call(
        Method::POST,
        gw.url("/v1/customization/jobs"),
        Some(json!({"output_model": "team/resumed", "config": "tiny",
            "dataset": {"name": "d", "namespace": "team"},
            "hyperparameters": {"epochs": 60, "batch_size": 2, "learning_rate": 0.001, "lora": {"adapter_dim": 2}}})),
    )
    .await;
    assert_eq!(st, 200, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    // Stop once a few epochs (each checkpointed) are done.
    let t = Instant::now();
    let before = loop {
        let (_, s) = call(
            Method::GET,
            gw.url(&format!("/v1/customization/jobs/{id}/status")),
            None,
        )
        .await;
        let done = s["steps_completed"].as_u64().unwrap_or(0);
        if done >= 3 {
            break done;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let gw = gw.restart();
    assert!(
        gw.log_text().contains("queueing a job left unfinished"),
        "{}",
        gw.log_text()
    );
    let t = Instant::now();
    let status = loop {
        let (_, s) = call(
            Method::GET,
            gw.url(&format!("/v1/customization/jobs/{id}/status")),
            None,
        )
        .await;
        if s["status"] == "completed" || s["status"] == "failed" {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["steps_completed"], 60);
    // Only the steps after the last checkpoint ran again: the new process reported fewer.
    let after_restart = status["metrics"]["train_loss"].as_array().unwrap();
    assert!(
        after_restart.first().unwrap()["step"].as_u64().unwrap() > 1,
        "{before} {status}"
    );
    let (st, _) = call(
        Method::POST,
        gw.url("/v1/chat/completions"),
        Some(json!({"model": "team/resumed", "messages": [{"role": "user", "content": "time in oslo"}], "max_tokens": 4})),
    )
    .await;
    assert_eq!(st, 200);
}
