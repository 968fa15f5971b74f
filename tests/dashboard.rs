//! The dashboard's data API over real HTTP: per-minute rollups kept by the traffic writer answer
//! the overview (totals, series, arms, the targets serving now) and agree with the traffic log;
//! bad parameters are 400s naming the parameter.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

async fn overview(gw: &GatewayProcess, query: &str) -> (u16, Value) {
    let r = reqwest::get(gw.url(&format!("/v1/dashboard/overview{query}")))
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn route<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == name)
        .unwrap_or_else(|| panic!("no route {name} in {v:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_counts_what_the_log_holds_per_route_arm_and_minute() {
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml("alpha", "mock", "echo", ""));
    config.push_str(&route_toml("beta", "mock", "bad-request", ""));
    config.push_str(&route_toml("gamma", "mock", "tools", ""));
    let gw = GatewayProcess::start(&config);
    let client = reqwest::Client::new();
    for (name, n) in [("alpha", 5), ("beta", 3), ("gamma", 2)] {
        for i in 0..n {
            let r = client
                .post(gw.url("/v1/chat/completions"))
                .json(&user_request(name, &format!("hello {i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().is_success(), name != "beta");
        }
    }

    // The writer is batched: the rollups land with the rows.
    let deadline = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let (st, v) = overview(&gw, "").await;
        assert_eq!(st, 200, "{v}");
        if route(&v, "alpha")["totals"]["requests"] == 5
            && route(&v, "beta")["totals"]["requests"] == 3
        {
            break v;
        }
        assert!(Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(v["window"], "1h");
    assert_eq!(v["step_ms"], 60_000);
    let alpha = route(&v, "alpha");
    let t = &alpha["totals"];
    assert_eq!(
        (t["errors"].as_u64(), t["error_rate"].as_f64()),
        (Some(0), Some(0.0)),
        "{t}"
    );
    assert!(t["latency_ms"]["p50"].as_f64().unwrap() > 0.0, "{t}");
    assert!(t["latency_ms"]["p95"].as_f64() >= t["latency_ms"]["p50"].as_f64());
    assert!(
        t["overhead_ms"]["p50"].as_f64().is_some(),
        "upstream answers have an overhead: {t}"
    );
    assert!(t["prompt_tokens"].as_u64().unwrap() > 0, "{t}");
    assert_eq!(alpha["arms"]["champion"]["totals"]["requests"], 5);
    assert_eq!(
        alpha["arms"]["champion"]["series"].as_array().map(Vec::len),
        alpha["series"].as_array().map(Vec::len)
    );
    assert_eq!(alpha["rollout"]["champion"]["upstream"], "mock");
    let in_series: u64 = alpha["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(p["t_ms"].as_i64().unwrap() >= v["since_ms"].as_i64().unwrap());
            p["requests"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(in_series, 5);
    let beta = &route(&v, "beta")["totals"];
    assert_eq!(
        (beta["errors"].as_u64(), beta["error_rate"].as_f64()),
        (Some(3), Some(1.0))
    );

    // One route, a longer window.
    let (st, one) = overview(&gw, "?route=beta&window=1d").await;
    assert_eq!(st, 200, "{one}");
    assert_eq!(one["routes"].as_array().unwrap().len(), 1);
    assert_eq!(one["step_ms"], 900_000);
    assert_eq!(route(&one, "beta")["totals"]["requests"], 3);

    // Bad parameters name themselves.
    for (query, param) in [("?window=2y", "window"), ("?route=omega", "route")] {
        let (st, e) = overview(&gw, query).await;
        assert_eq!(st, 400, "{query}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }
    let (st, e) = overview(&gw, "?since=yesterday").await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (400, Some("invalid_query")),
        "{e}"
    );

    // The traffic search: text, route, status and paging; one exchange in full.
    let search = |q: &str| {
        let url = gw.url(&format!("/v1/dashboard/traffic{q}"));
        async move {
            let r = reqwest::get(url).await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (st, found) = search("?q=hello%203&route=alpha").await;
    assert_eq!(st, 200, "{found}");
    let rows = found["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{found:#}");
    assert_eq!(rows[0]["prompt"], "hello 3");
    // Text is matched without regard to case.
    let (_, shouted) = search("?q=HELLO%203&route=alpha").await;
    assert_eq!(shouted["data"][0]["id"], rows[0]["id"], "{shouted:#}");
    let (_, errors) = search("?status=error").await;
    assert_eq!(errors["data"].as_array().unwrap().len(), 3);
    assert!(errors["data"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["route"] == "beta" && r["status"] == 400));
    let (_, called) = search("?tool=get_weather").await;
    let called = called["data"].as_array().unwrap();
    assert_eq!(called.len(), 2, "{called:?}");
    assert!(called
        .iter()
        .all(|r| r["route"] == "gamma" && r["tools"] == serde_json::json!(["get_weather"])));
    let (_, none) = search("?tool=get_time&route=gamma").await;
    assert!(none["data"].as_array().unwrap().is_empty());
    let (_, unchecked) = search("?verdict=none&route=alpha").await;
    assert_eq!(
        unchecked["data"].as_array().unwrap().len(),
        5,
        "no rail checks these routes"
    );
    // Paging two at a time shows each of the route's five requests once, newest first.
    let mut seen: Vec<(i64, String)> = Vec::new();
    let mut cursor = String::new();
    for _ in 0..3 {
        let (st, page) = search(&format!("?route=alpha&limit=2{cursor}")).await;
        assert_eq!(st, 200, "{page}");
        seen.extend(page["data"].as_array().unwrap().iter().map(|r| {
            (
                r["ts_ms"].as_i64().unwrap(),
                r["id"].as_str().unwrap().to_string(),
            )
        }));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0].0 >= w[1].0), "{seen:?}");
    let mut ids: Vec<&String> = seen.iter().map(|(_, id)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "{seen:?}");
    let id = rows[0]["id"].as_str().unwrap();
    let (st, one) = {
        let r = reqwest::get(gw.url(&format!("/v1/dashboard/traffic/{id}")))
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(st, 200, "{one}");
    assert_eq!(
        one["exchange"]["request"]["messages"][0]["content"],
        "hello 3"
    );
    assert!(one["shadows"].as_array().unwrap().is_empty());
    let r = reqwest::get(gw.url("/v1/dashboard/traffic/nope"))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    for (query, param) in [
        ("?status=teapot", "status"),
        ("?limit=0", "limit"),
        ("?arm=sideways", "arm"),
        ("?route=omega", "route"),
        ("?since_ms=20&until_ms=10", "since_ms"),
        ("?q=he", "q"),
        ("?cursor=yesterday", "cursor"),
    ] {
        let (st, e) = search(query).await;
        assert_eq!(st, 400, "{query}: {e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }

    // The rollups survive a restart and agree with the rows.
    let gw = gw.restart();
    let (_, v) = overview(&gw, "?route=alpha").await;
    assert_eq!(route(&v, "alpha")["totals"]["requests"], 5);
    let rows: i64 = gw
        .db()
        .query_row(
            "SELECT COUNT(*) FROM traffic WHERE route = 'alpha'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 5);
}

/// Whether Debian's chromium and chromium-driver are installed (scripts/test.sh installs them).
fn browser_installed() -> bool {
    std::path::Path::new("/usr/bin/chromium").exists()
        && std::path::Path::new("/usr/bin/chromedriver").exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    if !browser_installed() {
        println!("SKIPPED: chromium and chromium-driver are not installed (scripts/test.sh installs them with apt-get)");
        return;
    }
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    flywheel::engine::testing::write_tiny_llama_with_template(
        &model,
        candle_core::quantized::GgmlDType::F32,
        17,
        flywheel::engine::testing::TINY_TOOLS_TEMPLATE,
    );
    let mock = MockUpstream::start().await;
    let mut config = format!(
        r#"
[flywheel]
schedule = ""
check_interval_secs = 0.2

[[models]]
name = "tiny"
path = "{model}"
weights = "f32"
context_length = 2048
max_batch = 8
"#,
        model = path_str(&model)
    );
    config.push_str(&upstream_toml("mock", &mock.base_url(), ""));
    config.push_str(&route_toml(
        "plain",
        "mock",
        "echo",
        "guardrails = \"rules\"",
    ));
    config.push_str(&route_toml("agent", "mock", "agent", ""));
    config.push_str(
        r#"
[[rails.configs]]
name = "rules"
[rails.configs.data]
rails.input.flows = ["detect sensitive data on input", "regex check input"]
rails.config.regex_detection.input.patterns = ["(?i)drop\\s+table"]
"#,
    );
    config.push_str(
        r#"
[routes.flywheel]
student = "tiny"
min_records = 30
min_new_records = 0
validation_share = 0.1
test_share = 0.25
seed = 3
hyperparameters = { epochs = 40, batch_size = 6, learning_rate = 0.01, lora = { adapter_dim = 8 } }

[routes.flywheel.policy]
metric = "function_name_accuracy"
min_test_items = 8
teacher_margin = 0.3
max_tool_regression = 0.35
max_parse_failure_increase = 0.2

[routes.flywheel.rollout]
agreement_on = "names"
shadow_sample_rate = 1.0
shadow_min_samples = 1000
canary_percent = 50.0
canary_min_requests = 1000
canary_mirror_rate = 1.0
guard_min_requests = 1000

[routes.flywheel.drift]
new_tool_min_records = 100000
"#,
    );
    let gw = GatewayProcess::start(&config);
    let client = reqwest::Client::new();
    let send = |route: &'static str, text: String| {
        let client = client.clone();
        let url = gw.url("/v1/chat/completions");
        async move {
            let mut body = user_request(route, &text);
            if route == "agent" {
                body["tools"] = weather_tools();
            }
            let r = client.post(url).json(&body).send().await.unwrap();
            assert!(r.status().is_success(), "{}", r.status());
            r.headers()["x-request-id"].to_str().unwrap().to_string()
        }
    };

    // Traffic on two routes, a prompt carrying a script, a run, and a canary.
    let mut agent_ids = Vec::new();
    for i in 0..40 {
        agent_ids.push(
            send(
                "agent",
                format!("what is the weather like in town number {i}?"),
            )
            .await,
        );
    }
    let known = "where did my parcel 4417 go";
    send("plain", known.to_string()).await;
    send(
        "plain",
        "<script>window.__pwned = 1</script> pwned?".to_string(),
    )
    .await;
    for i in 0..5 {
        send("plain", format!("small talk {i}")).await;
    }
    // The rails block one request (its category shows on the Rails page).
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .json(&user_request("plain", "please drop table users"))
        .send()
        .await
        .unwrap();
    let blocked = r.text().await.unwrap();
    assert!(
        blocked.contains("rail") || blocked.contains("content_filter") || blocked.contains("block"),
        "{blocked}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client
        .post(gw.url("/v1/flywheel/runs"))
        .json(&serde_json::json!({"route": "agent"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let run_id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(240);
    let run = loop {
        let run: Value = reqwest::get(gw.url(&format!("/v1/flywheel/runs/{run_id}")))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if run["status"] != "running" {
            break run;
        }
        assert!(Instant::now() < deadline, "{run:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        run["decision"]["promote"],
        true,
        "{run:#}\n{}",
        gw.log_text()
    );
    for _ in 0..4 {
        send("agent", "shadowed question".to_string()).await;
    }
    let r = client
        .post(gw.url("/v1/flywheel/routes/agent/promote"))
        .json(&serde_json::json!({"reason": "straight to canary for the dashboard test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for i in 0..16 {
        send("agent", format!("canary question {i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    let out = run_script(
        python,
        "dashboard_browser.py",
        &[
            gw.url(""),
            run_id,
            agent_ids[0].clone(),
            known.to_string(),
            path_str(&shots),
        ],
    )
    .await;
    println!("{out}");
    assert!(out.contains("ok rollback"), "{out}");
    for page in [
        "overview", "traffic", "runs", "run", "rollouts", "adapters", "rails", "jobs",
    ] {
        assert!(
            shots.join(format!("{page}.png")).exists(),
            "no screenshot of {page}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_and_its_login_cookie_is_guarded() {
    let mock = MockUpstream::start().await;
    let mut config = keyed_auth_toml();
    config.push_str(&upstream_toml("mock", &mock.base_url(), ""));
    config.push_str(&route_toml("agent", "mock", "echo", ""));
    let gw = GatewayProcess::start(&config);
    let client = reqwest::Client::new();

    // The page and its assets are served to anyone, hardened; every view is the same page.
    for path in ["/ui/", "/ui/runs/run-1", "/ui/traffic"] {
        let r = client.get(gw.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("script-src 'self'"));
        assert!(r.text().await.unwrap().contains("/ui/assets/app.js"));
    }
    let r = client
        .get(gw.url("/ui/assets/app.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    let r = client
        .get(gw.url("/ui/assets/nope.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // The data needs the admin scope; the login checks it and sets a guarded cookie.
    let overview = gw.url("/v1/dashboard/overview");
    assert_eq!(client.get(&overview).send().await.unwrap().status(), 401);
    let login = |key: &str| {
        client
            .post(gw.url("/ui/login"))
            .json(&serde_json::json!({"key": key}))
            .send()
    };
    assert_eq!(login("sk-wrong").await.unwrap().status(), 401);
    assert_eq!(login("sk-agent").await.unwrap().status(), 403);
    assert_eq!(login("sk admin;x").await.unwrap().status(), 400);
    let r = login("sk-admin").await.unwrap();
    assert_eq!(r.status(), 200);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for part in [
        "flywheel_key=sk-admin",
        "HttpOnly",
        "SameSite=Strict",
        "Path=/",
    ] {
        assert!(cookie.contains(part), "{cookie}");
    }
    let session = "flywheel_key=sk-admin";
    let r = client
        .get(&overview)
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // A change sent with the cookie needs the page's header; another site's page gets nothing.
    let change = |headers: &[(&str, &str)]| {
        let mut r = client
            .post(gw.url("/v1/adapters"))
            .json(&serde_json::json!({}));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let r = change(&[("cookie", session)]).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "csrf");
    let r = change(&[("cookie", session), ("x-flywheel-csrf", "1")])
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "past the guard, the empty body is refused");
    let r = change(&[
        ("authorization", "Bearer sk-admin"),
        ("sec-fetch-site", "cross-site"),
    ])
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    let r = client.post(gw.url("/ui/logout")).send().await.unwrap();
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
}
