//! The deployment files (Kubernetes manifests, the compose file) are valid, and the Flywheel
//! configs they carry pass `flywheel check`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn the_deployment_files_are_valid_and_their_configs_check() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let python = python_with_openai();
    let status = Command::new(&python)
        .arg(root.join("tests/python/deploy_check.py"))
        .arg(root.join("deploy"))
        .arg(out.path())
        .status()
        .unwrap();
    assert!(status.success(), "deploy_check.py failed");
    let configs: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(configs.len(), 2, "{configs:?}");
    for config in configs {
        let checked = Command::new(bin())
            .args(["check", "--config"])
            .arg(&config)
            .env(
                "FLYWHEEL_DATABASE_URL",
                "postgres://flywheel:pw@db:5432/flywheel",
            )
            .env("FLYWHEEL_DB_PASSWORD", "pw")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&checked.stdout);
        assert!(
            checked.status.success(),
            "{}: {stdout}{}",
            config.display(),
            String::from_utf8_lossy(&checked.stderr)
        );
        // The password is used, never shown.
        assert!(
            stdout.contains("store    postgres://flywheel:***@"),
            "{stdout}"
        );
    }
}
