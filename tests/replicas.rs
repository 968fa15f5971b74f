//! Several gateways on one PostgreSQL store: a rollout changed through one replica is served by
//! the others, one replica leads the flywheel at a time and another takes over when it dies,
//! and no request a surviving replica answered is missing from the shared log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use flywheel::store::testing::fresh_postgres;
use serde_json::{json, Value};

/// `flywheel_leader` from a replica's metrics (None while it does not answer).
async fn leads(client: &reqwest::Client, gw: &GatewayProcess) -> Option<bool> {
    let text = client
        .get(gw.url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let line = text.lines().find(|l| l.starts_with("flywheel_leader "))?;
    Some(line.trim_end().ends_with(" 1"))
}

/// Polls `check` until it holds, for at most `limit`; returns how long it took.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within {limit:?}");
}

async fn champion(client: &reqwest::Client, gw: &GatewayProcess) -> Value {
    let r: Value = client
        .get(gw.url("/admin/routes/agent"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["champion"].clone()
}

/// Sends `n` requests to `gw` tagged `workload`; returns how many were answered (200).
async fn load(client: reqwest::Client, url: String, workload: String, n: usize) -> usize {
    let mut answered = 0;
    for i in 0..n {
        let sent = client
            .post(&url)
            .header("x-workload-id", &workload)
            .json(&user_request("agent", &format!("question {i}")))
            .send()
            .await;
        if sent.is_ok_and(|r| r.status() == 200) {
            answered += 1;
        }
    }
    answered
}

async fn logged(db: &flywheel::store::Db, workload: &str) -> i64 {
    let workload = workload.to_string();
    db.call(move |c| {
        c.value::<i64>(
            "SELECT COUNT(*) FROM traffic WHERE workload_id = ?1",
            flywheel::store::sql::args![workload],
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_rollouts_lead_one_at_a_time_and_lose_no_answered_request() {
    let Some((db, url)) = fresh_postgres("replicas_share_rollouts") else {
        return;
    };
    let mock = MockUpstream::start().await;
    let client = reqwest::Client::new();
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml("agent", "mock", "echo", ""));
    config.push_str(&format!(
        "[store]\nurl = \"{url}\"\n[flywheel]\ncheck_interval_secs = 0.2\n[[metrics]]\nname = \"thumbs_up\"\ntype = \"boolean\"\n"
    ));
    let mut a = GatewayProcess::start(&config);
    let mut b = GatewayProcess::start(&config);

    // Exactly one leads.
    within(Duration::from_secs(10), "one replica leads", || async {
        let (x, y) = (leads(&client, &a).await, leads(&client, &b).await);
        matches!(
            (x, y),
            (Some(true), Some(false)) | (Some(false), Some(true))
        )
    })
    .await;
    let a_leads = leads(&client, &a).await == Some(true);

    // A rollout changed through one replica is served by the other.
    let put = client
        .put(a.url("/admin/routes/agent"))
        .json(&json!({"champion": {"upstream": "mock", "model": "tools"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().await.unwrap());
    let took = within(
        Duration::from_secs(10),
        "the change reaches the other replica",
        || async { champion(&client, &b).await["model"] == "tools" },
    )
    .await;
    println!("the rollout reached the other replica in {took:?}");
    let before = mock.count("tools");
    let r = client
        .post(b.url("/v1/chat/completions"))
        .json(&user_request("agent", "hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        mock.count("tools"),
        before + 1,
        "the other replica serves the new champion"
    );

    // Feedback on an answer one replica gave, sent at once to the other, is taken.
    for i in 0..20 {
        let r = client
            .post(a.url("/v1/chat/completions"))
            .json(&user_request("agent", &format!("rate me {i}")))
            .send()
            .await
            .unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let fb = client
            .post(b.url("/v1/feedback"))
            .json(&json!({"request_id": id, "metric": "thumbs_up", "value": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(fb.status(), 201, "{}", fb.text().await.unwrap());
    }

    // A third replica whose config names another champion follows the store, and says so.
    let mut c = GatewayProcess::start(&config);
    within(
        Duration::from_secs(10),
        "the third replica follows the store",
        || async { champion(&client, &c).await["model"] == "tools" },
    )
    .await;
    assert!(
        c.log_text()
            .contains("another champion than the shared store"),
        "{}",
        c.log_text()
    );
    c.stop();

    // Under load on both, the leader is killed: the other keeps serving, logs all it answered,
    // and takes the lead.
    let (leader, survivor) = if a_leads {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let on_survivor = tokio::spawn(load(
        client.clone(),
        survivor.url("/v1/chat/completions"),
        "survivor".into(),
        3000,
    ));
    let on_leader = tokio::spawn(load(
        client.clone(),
        leader.url("/v1/chat/completions"),
        "leader".into(),
        3000,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    let answered_by_leader = on_leader.await.unwrap();
    let answered = on_survivor.await.unwrap();
    assert_eq!(answered, 3000, "the survivor kept serving");
    assert!(
        answered_by_leader < 3000,
        "the leader was killed while under load"
    );
    let took = within(
        Duration::from_secs(20),
        "the survivor takes the lead",
        || async { leads(&client, survivor).await == Some(true) },
    )
    .await;
    println!("the survivor took the lead {took:?} after the leader was killed (it had answered {answered_by_leader})");

    // SIGTERM after more load: the survivor drains its queue before it exits.
    let more = load(
        client.clone(),
        survivor.url("/v1/chat/completions"),
        "survivor".into(),
        100,
    )
    .await;
    assert_eq!(more, 100);
    assert!(survivor.stop().success());
    assert_eq!(
        logged(&db, "survivor").await,
        (answered + more) as i64,
        "every request the survivor answered is in the shared log"
    );
    // The command-line export reads the same shared log.
    let exported = export_records(survivor);
    assert_eq!(
        exported
            .iter()
            .filter(|r| r["workload_id"] == "survivor")
            .count(),
        answered + more
    );
}

/// `flywheel serve` on `store`; returns its exit status and what it printed.
fn serve_with_store(store: &str, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flywheel.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[store]\n{store}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["serve", "--config"]).arg(&config);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_bad_or_unreachable_store_stops_the_start_with_the_cause() {
    // Nothing listens on port 1.
    let (ok, out) = serve_with_store("url = \"postgres://flywheel@127.0.0.1:1/flywheel\"", &[]);
    assert!(!ok);
    assert!(
        out.contains("cannot reach PostgreSQL at postgres://flywheel@127.0.0.1:1/flywheel"),
        "{out}"
    );
    // A password in the file is refused, and not echoed.
    let (ok, out) = serve_with_store("url = \"postgres://flywheel:hunter2@db/flywheel\"", &[]);
    assert!(!ok);
    assert!(out.contains("must not carry a password"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
    let (ok, out) = serve_with_store("url = \"mysql://flywheel@db/flywheel\"", &[]);
    assert!(!ok);
    assert!(out.contains("must start with postgres://"), "{out}");
    // The password's variable is named but not set.
    let (ok, out) = serve_with_store(
        "url = \"postgres://flywheel@127.0.0.1:1/flywheel\"\npassword_env = \"FLYWHEEL_TEST_UNSET_PASSWORD\"",
        &[],
    );
    assert!(!ok);
    assert!(out.contains("FLYWHEEL_TEST_UNSET_PASSWORD"), "{out}");
    // A malformed URL from the environment is named without its password.
    let (ok, out) = serve_with_store(
        "url_env = \"FLYWHEEL_TEST_URL\"",
        &[(
            "FLYWHEEL_TEST_URL",
            "postgres://flywheel:hunter2@db:notaport/flywheel",
        )],
    );
    assert!(!ok);
    assert!(out.contains("not a valid PostgreSQL URL"), "{out}");
    assert!(!out.contains("hunter2"), "{out}");
}

/// What replica `gw` answers a request checked against guardrail config `default/shared`: the
/// status and the error code.
async fn guarded(client: &reqwest::Client, gw: &GatewayProcess, text: &str) -> (u16, Value) {
    let mut body = user_request("agent", text);
    body["guardrails"] = json!({"config_id": "shared"});
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, v["error"]["code"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guardrail_config_changed_through_one_replica_is_followed_by_the_others() {
    let Some((_db, url)) = fresh_postgres("replicas_share_guardrails") else {
        return;
    };
    let mock = MockUpstream::start().await;
    let client = reqwest::Client::new();
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml("agent", "mock", "echo", ""));
    config.push_str(&format!("[store]\nurl = \"{url}\"\n"));
    let mut a = GatewayProcess::start(&config);
    let mut b = GatewayProcess::start(&config);
    let deny = |pattern: &str| json!({"rails": {"input": {"flows": ["regex check input"]}, "config": {"regex_detection": {"input": {"patterns": [pattern]}}}}});

    // Created on one replica: the other checks with it.
    let r = client
        .post(a.url("/v1/guardrail/configs"))
        .json(&json!({"name": "shared", "data": deny("(?i)drop\\s+table")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let took = within(
        Duration::from_secs(10),
        "the config reaches the other replica",
        || async {
            guarded(&client, &b, "please DROP TABLE users").await == (400, json!("content_filter"))
        },
    )
    .await;
    println!("the guardrail config reached the other replica in {took:?}");
    assert_eq!(guarded(&client, &b, "rm -rf /").await.0, 200);

    // Changed on the other: followed back.
    let r = client
        .patch(b.url("/v1/guardrail/configs/default/shared"))
        .json(&json!({"data": deny("(?i)rm\\s+-rf")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    within(
        Duration::from_secs(10),
        "the change reaches the first replica",
        || async { guarded(&client, &a, "rm -rf /").await == (400, json!("content_filter")) },
    )
    .await;
    assert_eq!(guarded(&client, &a, "please DROP TABLE users").await.0, 200);

    // Deleted: gone everywhere.
    let r = client
        .delete(a.url("/v1/guardrail/configs/default/shared"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    within(
        Duration::from_secs(10),
        "the deletion reaches the other replica",
        || async {
            guarded(&client, &b, "hello").await == (400, json!("guardrail_config_not_found"))
        },
    )
    .await;
    assert!(a.stop().success());
    assert!(b.stop().success());
}
