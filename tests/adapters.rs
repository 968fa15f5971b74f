//! LoRA adapter registry over HTTP on a tiny random model: load, serve by name, hot swap under
//! load, LRU eviction, vLLM-compatible endpoints, and every bad input.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use flywheel::engine::testing::{write_tiny_adapter, write_tiny_llama};
use serde_json::{json, Value};

use flywheel::engine::lora::MODULES as ALL;

struct Setup {
    _dir: tempfile::TempDir,
    adapters: std::path::PathBuf,
    outside: std::path::PathBuf,
    gw: GatewayProcess,
}

fn setup(max_adapters: usize) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, candle_core::quantized::GgmlDType::Q8_0, 21);
    let adapters = dir.path().join("adapters");
    for (i, name) in ["a1", "a2", "a3"].iter().enumerate() {
        write_tiny_adapter(&adapters.join(name), 4, 16.0, &ALL, i as u64 + 1);
    }
    let outside = dir.path().join("elsewhere");
    write_tiny_adapter(&outside, 4, 16.0, &ALL, 9);
    let config = format!(
        "[[models]]\nname = \"tiny\"\npath = \"{}\"\ncontext_length = 128\nmax_adapters = {max_adapters}\n[adapters]\nallowed_dirs = [\"{}\"]\n[[routes]]\nname = \"base\"\nchampion = {{ local = \"tiny\" }}\n[[routes]]\nname = \"tuned\"\nchampion = {{ local = \"tiny\", adapter = \"team/a2\" }}\n",
        path_str(&model),
        path_str(&adapters)
    );
    let gw = GatewayProcess::start(&config);
    Setup {
        _dir: dir,
        adapters,
        outside,
        gw,
    }
}

async fn load(gw: &GatewayProcess, name: &str, path: &std::path::Path) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(gw.url("/v1/adapters"))
        .json(&json!({"name": name, "path": path_str(path)}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn complete(gw: &GatewayProcess, model: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6, "temperature": 0}))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_load_serve_swap_and_unload() {
    let mut s = setup(8);
    let gw = &s.gw;
    let (st, v) = load(gw, "team/a1", &s.adapters.join("a1")).await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (v["rank"].as_u64(), v["base_model"].as_str()),
        (Some(4), Some("tiny"))
    );
    assert_eq!(v["target_modules"].as_array().unwrap().len(), 7);

    // Served by name over its base, and different from the base.
    let (st, base) = complete(gw, "base").await;
    assert_eq!(st, 200, "{base}");
    let (st, tuned) = complete(gw, "team/a1").await;
    assert_eq!(st, 200, "{tuned}");
    assert_eq!(tuned["model"], "team/a1");
    assert_ne!(text(&base), text(&tuned), "the adapter changes the output");
    let models: Value = reqwest::get(gw.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "team/a1"));

    // A route naming an adapter that is not loaded: 404; once loaded, it serves.
    let (st, v) = complete(gw, "tuned").await;
    assert_eq!(st, 404, "{v}");
    assert_eq!(load(gw, "team/a2", &s.adapters.join("a2")).await.0, 201);
    let (st, v) = complete(gw, "tuned").await;
    assert_eq!(st, 200, "{v}");

    // Hot swap under load: reloads and other loads while requests run; none fails.
    let mut handles = Vec::new();
    for i in 0..24 {
        let url = gw.url("/v1/chat/completions");
        handles.push(tokio::spawn(async move {
            let model = if i % 3 == 0 { "base" } else { "team/a1" };
            let body = json!({"model": model, "messages": [{"role": "user", "content": format!("req {i}")}], "max_tokens": 8});
            reqwest::Client::new().post(url).json(&body).send().await.unwrap().status().as_u16()
        }));
    }
    for round in 0..3 {
        let src = if round % 2 == 0 { "a3" } else { "a1" };
        assert_eq!(load(gw, "team/a1", &s.adapters.join(src)).await.0, 201);
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), 200);
    }

    // Listing, vLLM's endpoints, and unloading.
    let list: Value = reqwest::get(gw.url("/v1/adapters"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["team/a1", "team/a2"]);
    // team/a2 has served the one request the route sent it since it was loaded.
    assert_eq!(list["data"][1]["requests_served"], 1, "{list}");
    let client = reqwest::Client::new();
    let r = client
        .post(gw.url("/v1/load_lora_adapter"))
        .json(&json!({"lora_name": "sql_adapter", "lora_path": path_str(&s.adapters.join("a3"))}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("added successfully"));
    assert_eq!(complete(gw, "sql_adapter").await.0, 200);
    let r = client
        .post(gw.url("/v1/unload_lora_adapter"))
        .json(&json!({"lora_name": "sql_adapter"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(complete(gw, "sql_adapter").await.0, 404);
    let r = client
        .delete(gw.url("/v1/adapters/team/a1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(complete(gw, "team/a1").await.0, 404);
    let r = client
        .delete(gw.url("/v1/adapters/team/a1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    assert!(s.gw.stop().success());
    let n: i64 =
        s.gw.db()
            .query_row(
                "SELECT COUNT(*) FROM traffic WHERE adapter = 'team/a1' AND status = 200",
                [],
                |r| r.get(0),
            )
            .unwrap();
    assert!(n >= 17, "{n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_adapters_are_refused_clearly_and_the_lru_cap_holds() {
    let mut s = setup(2);
    let gw = &s.gw;
    let (st, v) = load(gw, "team/x", &s.outside).await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["code"], "path_not_allowed", "{v}");
    let (st, v) = load(
        gw,
        "team/x",
        &s.adapters
            .join("a1")
            .join("..")
            .join("..")
            .join("elsewhere"),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["code"], "path_not_allowed", "{v}");
    let (st, v) = load(gw, "../evil", &s.adapters.join("a1")).await;
    assert_eq!(st, 400);
    assert_eq!(v["error"]["param"], "name");
    // An adapter for another base (wrong hidden size).
    let wrong = s.adapters.join("wrong");
    write_tiny_adapter(&wrong, 4, 8.0, &["q_proj"], 5);
    let st_path = wrong.join("adapter_model.safetensors");
    let mut t = candle_core::safetensors::load(&st_path, &candle_core::Device::Cpu).unwrap();
    for layer in 0..2 {
        let k = format!("base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight");
        t.insert(
            k,
            candle_core::Tensor::zeros((4, 96), candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
        );
    }
    candle_core::safetensors::save(&t, &st_path).unwrap();
    let (st, v) = load(gw, "team/wrong", &wrong).await;
    assert_eq!(st, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("another base"),
        "{v}"
    );
    // Corrupt weights and a missing config.
    let corrupt = s.adapters.join("corrupt");
    write_tiny_adapter(&corrupt, 4, 8.0, &["q_proj"], 6);
    std::fs::write(corrupt.join("adapter_model.safetensors"), b"\x00garbage").unwrap();
    let (st, v) = load(gw, "team/corrupt", &corrupt).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_adapter")),
        "{v}"
    );
    std::fs::remove_file(corrupt.join("adapter_config.json")).unwrap();
    assert_eq!(load(gw, "team/corrupt", &corrupt).await.0, 400);
    // Nothing half-loaded: the registry is still empty and the base still serves.
    let list: Value = reqwest::get(gw.url("/v1/adapters"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    assert_eq!(complete(gw, "base").await.0, 200);

    // At most two resident: the least recently used goes.
    assert_eq!(load(gw, "team/a1", &s.adapters.join("a1")).await.0, 201);
    assert_eq!(load(gw, "team/a2", &s.adapters.join("a2")).await.0, 201);
    assert_eq!(complete(gw, "team/a1").await.0, 200);
    let (st, v) = load(gw, "team/a3", &s.adapters.join("a3")).await;
    assert_eq!(st, 201);
    assert_eq!(v["evicted"], json!(["team/a2"]));
    assert_eq!(complete(gw, "team/a2").await.0, 404);
    assert_eq!(complete(gw, "team/a1").await.0, 200);
    assert!(s.gw.stop().success());
}

/// Adapters are held in 4 bits by default: a rank-8 adapter takes under 70% of the bytes it takes
/// with `adapter_bits = 8`, and both serve; a rank-4 one, which 4 bits would not make smaller, is
/// held in int8 either way and serves too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_are_held_in_four_bits_unless_told_eight() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    write_tiny_llama(&model, candle_core::quantized::GgmlDType::Q8_0, 21);
    let adapters = dir.path().join("adapters");
    write_tiny_adapter(&adapters.join("r8"), 8, 16.0, &ALL, 3);
    write_tiny_adapter(&adapters.join("r4"), 4, 16.0, &ALL, 4);
    let mut bytes = Vec::new();
    for setting in ["", "adapter_bits = 8\n"] {
        let config = format!(
            "[[models]]\nname = \"tiny\"\npath = \"{}\"\ncontext_length = 128\n{setting}[adapters]\nallowed_dirs = [\"{}\"]\n[[routes]]\nname = \"base\"\nchampion = {{ local = \"tiny\" }}\n",
            path_str(&model),
            path_str(&adapters)
        );
        let gw = GatewayProcess::start(&config);
        let (st, base) = complete(&gw, "base").await;
        assert_eq!(st, 200, "{base}");
        let mut held = Vec::new();
        for (name, rank) in [("team/r8", 8), ("team/r4", 4)] {
            let (st, v) = load(&gw, name, &adapters.join(&name[5..])).await;
            assert_eq!(st, 201, "{v}");
            assert_eq!(v["rank"].as_u64(), Some(rank));
            held.push(v["bytes"].as_u64().unwrap());
            let (st, tuned) = complete(&gw, name).await;
            assert_eq!(st, 200, "{tuned}");
            assert_ne!(
                text(&base),
                text(&tuned),
                "{name} changes the output ({setting:?})"
            );
        }
        bytes.push(held);
    }
    let (four, eight) = (&bytes[0], &bytes[1]);
    assert!(
        (four[0] as f64) < 0.7 * eight[0] as f64,
        "rank 8: {} bytes by default, {} at 8 bits",
        four[0],
        eight[0]
    );
    assert_eq!(four[1], eight[1], "rank 4 is held in int8 either way");
}
