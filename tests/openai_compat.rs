//! The gateway driven by official Python clients: the `openai` package, and `huggingface_hub` for
//! NeMo Data Store's upload path (installed into a virtualenv under `target/` on first run, pinned
//! by tests/python/requirements.txt).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_works_unchanged_against_the_gateway() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    for m in ["echo", "tools", "parallel"] {
        config.push_str(&route_toml(m, "mock", m, ""));
    }
    config.push_str("[[rails.configs]]\nname = \"pii\"\ndata = { rails = { input = { flows = [\"detect sensitive data on input\"] } } }\n");
    config.push_str("[[metrics]]\nname = \"thumbs_up\"\ntype = \"boolean\"\n");
    let mut gw = GatewayProcess::start(&config);
    let stdout = run_script(python, "openai_compat.py", &[gw.url("/v1")]).await;
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count() >= 19,
        "{stdout}"
    );
    assert!(gw.stop().success());
    let (n, workload): (i64, i64) = gw
        .db()
        .query_row(
            "SELECT COUNT(*), SUM(workload_id = 'py-compat') FROM traffic",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // Seven served requests and three refused ones, all recorded.
    assert_eq!(n, 10);
    assert_eq!(workload, 1);
    let (episode, feedback): (i64, i64) = gw
        .db()
        .query_row(
            "SELECT (SELECT COUNT(*) FROM traffic WHERE episode_id = 'py-task'), (SELECT COUNT(*) FROM feedback)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((episode, feedback), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_huggingface_hub_client_uploads_datasets_as_nemo_data_store_takes_them() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mut gw = GatewayProcess::start("");
    let stdout = run_script(python, "hf_upload.py", &[gw.url("")]).await;
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count(),
        3,
        "{stdout}"
    );
    let ds: serde_json::Value = reqwest::get(gw.url("/v1/datasets/team/hf-tools"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The good file is stored; the refused one left nothing behind.
    assert_eq!(ds["files"].as_array().unwrap().len(), 1, "{ds}");
    assert_eq!(ds["files"][0]["path"], "training/train.jsonl");
    let stored = std::fs::read_to_string(
        gw.dir
            .path()
            .join("data/datasets/team/hf-tools/training/train.jsonl"),
    )
    .unwrap();
    assert_eq!(stored.lines().count(), 5);
    assert!(gw.stop().success());
}
