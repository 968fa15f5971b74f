//! The gateway driven by official Python clients: the `openai` package, and `huggingface_hub` for
//! NeMo Data Store's upload path (installed into a virtualenv under `target/` on first run, pinned
//! by tests/python/requirements.txt).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A Python with the pinned `openai` package: `FLYWHEEL_TEST_PYTHON` if set, else a virtualenv
/// created (once) under target/.
fn python_with_openai() -> PathBuf {
    if let Ok(p) = std::env::var("FLYWHEEL_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    // The tests of this file share one virtualenv: one creates it while the others wait.
    static SETUP: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = SETUP.lock().unwrap_or_else(|p| p.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target").join("pyenv");
    let python = venv.join("bin").join("python");
    let requirements = root.join("tests/python/requirements.txt");
    let stamp = venv.join(".requirements");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) && python.exists() {
        return python;
    }
    let ok = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .unwrap()
        .success();
    assert!(ok, "python3 -m venv failed");
    let ok = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
        ])
        .arg(&requirements)
        .status()
        .unwrap()
        .success();
    assert!(ok, "pip install -r {} failed", requirements.display());
    std::fs::write(&stamp, wanted).unwrap();
    python
}

/// Runs `tests/python/<script> <base_url>`, asserts it succeeded, and returns its stdout.
async fn run_script(python: PathBuf, script: &str, base_url: String) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(&path)
            .arg(&base_url)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

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
    let mut gw = GatewayProcess::start(&config);
    let stdout = run_script(python, "openai_compat.py", gw.url("/v1")).await;
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count() >= 16,
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
    // Five served requests and three refused ones, all recorded.
    assert_eq!(n, 8);
    assert_eq!(workload, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_huggingface_hub_client_uploads_datasets_as_nemo_data_store_takes_them() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mut gw = GatewayProcess::start("");
    let stdout = run_script(python, "hf_upload.py", gw.url("")).await;
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
