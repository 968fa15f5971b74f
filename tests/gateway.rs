//! Whole-binary tests: the real `flywheel serve` over real HTTP and a real SQLite file, against a
//! mock OpenAI-compatible upstream.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// One upstream serving every mock behaviour and one route per behaviour.
fn standard_config(mock: &MockUpstream) -> String {
    let mut c = upstream_toml(
        "mock",
        &mock.base_url(),
        "api_key_env = \"FLYWHEEL_TEST_UPSTREAM_KEY\"\nfirst_byte_timeout_ms = 1500\n[upstreams.headers]\nx-extra = \"extra-value\"",
    );
    c.push_str(&upstream_toml(
        "single",
        &mock.base_url(),
        "supports_n = false",
    ));
    for m in [
        "echo",
        "tools",
        "tools-alt",
        "parallel",
        "midstream-fail",
        "flaky",
        "bad-request",
        "garbage",
        "wrong-ctype",
        "truncated",
        "hang",
        "slow",
        "endless",
        "rate-limited",
    ] {
        c.push_str(&route_toml(m, "mock", m, ""));
    }
    c.push_str(&route_toml(
        "fallback-route",
        "mock",
        "always-500",
        "fallbacks = [{ upstream = \"mock\", model = \"echo\" }]",
    ));
    c.push_str(&route_toml("single-n", "single", "echo-single", ""));
    c
}

async fn start() -> (MockUpstream, GatewayProcess) {
    let mock = MockUpstream::start().await;
    let gw = GatewayProcess::start_with_env(
        &standard_config(&mock),
        &[("FLYWHEEL_TEST_UPSTREAM_KEY", "sk-upstream-secret")],
    );
    (mock, gw)
}

async fn post(gw: &GatewayProcess, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn post_raw(gw: &GatewayProcess, body: &'static str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

fn assert_envelope(v: &Value) {
    let e = v["error"]
        .as_object()
        .unwrap_or_else(|| panic!("not an error envelope: {v}"));
    for k in ["message", "type", "param", "code"] {
        assert!(e.contains_key(k), "envelope lacks {k}: {v}");
    }
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_request_passes_through_faithfully_and_is_logged() {
    let (mock, mut gw) = start().await;
    let body = json!({
        "model": "echo",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c0", "content": "noon"},
            {"role": "user", "content": "hello there"}
        ],
        "tools": weather_tools(), "tool_choice": "auto", "parallel_tool_calls": true,
        "response_format": {"type": "text"}, "temperature": 0.3, "top_p": 0.9, "max_completion_tokens": 64,
        "stop": ["END"], "seed": 7, "n": 1, "user": "u-1", "metadata": {"client_id": "meta-client"},
        "some_vendor_field": {"keep": [1, 2, 3]}
    });
    let resp = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .header("x-workload-id", "wl-test")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(resp.headers()["x-flywheel-arm"], "champion");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: hello there");
    assert_eq!(v["usage"]["total_tokens"], 18);

    let seen = mock.requests_for("echo");
    assert_eq!(seen.len(), 1);
    let (headers, forwarded) = &seen[0];
    // Everything the client sent arrives unchanged, unknown fields included.
    let mut expected = body.clone();
    expected["model"] = json!("echo");
    assert_eq!(forwarded, &expected);
    assert_eq!(headers["authorization"], "Bearer sk-upstream-secret");
    assert_eq!(headers["x-extra"], "extra-value");

    assert!(gw.stop().success());
    assert!(
        !gw.log_text().contains("sk-upstream-secret"),
        "the upstream key leaked into the log"
    );
    let db = gw.db();
    let (id, workload, client, route, arm, status, target, response): (String, String, String, String, String, i64, String, String) = db
        .query_row(
            "SELECT id, workload_id, client_id, route, arm, status, target_model, response FROM traffic",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?)),
        )
        .unwrap();
    assert_eq!(id, request_id);
    assert_eq!(
        (
            workload.as_str(),
            client.as_str(),
            route.as_str(),
            arm.as_str(),
            status,
            target.as_str()
        ),
        ("wl-test", "meta-client", "echo", "champion", 200, "echo")
    );
    let response: Value = serde_json::from_str(&response).unwrap();
    assert_eq!(
        response["choices"][0]["message"]["content"],
        "echo: hello there"
    );
    let tokens: i64 = db
        .query_row("SELECT total_tokens FROM traffic", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tokens, 18);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_text_follows_openai_framing_and_usage_rules() {
    let (mock, mut gw) = start().await;
    // Without include_usage: the gateway still asks the upstream for usage (for the log) but
    // strips the usage chunk from the client's copy.
    let mut body = user_request("echo", "one two three");
    body["stream"] = json!(true);
    let resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks[1..]
            .iter()
            .all(|c| c["choices"][0]["delta"].get("role").is_none()),
        "role only on the first chunk"
    );
    assert!(
        chunks
            .iter()
            .all(|c| !c["choices"].as_array().unwrap().is_empty()),
        "no usage chunk was asked for"
    );
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "echo: one two three");
    assert_eq!(
        mock.requests_for("echo")[0].1["stream_options"]["include_usage"],
        true
    );

    // With include_usage: the usage chunk arrives, with empty choices, before [DONE].
    body["stream_options"] = json!({"include_usage": true});
    let text = post(&gw, &body).await.text().await.unwrap();
    let events = sse_events(&text);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["total_tokens"], 18);

    assert!(gw.stop().success());
    let db = gw.db();
    let rows: Vec<(String, i64, Option<f64>, i64)> = db
        .prepare("SELECT response, stream, ttft_ms, total_tokens FROM traffic ORDER BY ts_ms")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), 2);
    for (response, stream, ttft, tokens) in rows {
        let v: Value = serde_json::from_str(&response).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "echo: one two three");
        assert_eq!(stream, 1);
        assert!(ttft.is_some());
        assert_eq!(tokens, 18);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_single_and_parallel_streamed_and_not_are_served_and_logged_per_call() {
    let (_mock, mut gw) = start().await;
    for (model, stream) in [
        ("tools", false),
        ("tools", true),
        ("parallel", false),
        ("parallel", true),
    ] {
        let mut body = user_request(model, "weather in Paris?");
        body["tools"] = weather_tools();
        body["stream"] = json!(stream);
        let resp = post(&gw, &body).await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        let calls: Vec<(String, String)> = if stream {
            let events = sse_events(&text);
            assert_eq!(events.last().unwrap(), "[DONE]");
            let mut calls: Vec<(String, String)> = Vec::new();
            for e in &events[..events.len() - 1] {
                let c: Value = serde_json::from_str(e).unwrap();
                for d in c["choices"][0]["delta"]["tool_calls"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    let i = d["index"].as_u64().expect("index on every tool-call delta") as usize;
                    if i == calls.len() {
                        assert!(
                            d["id"].is_string()
                                && d["type"] == "function"
                                && d["function"]["name"].is_string()
                        );
                        calls.push((
                            d["function"]["name"].as_str().unwrap().into(),
                            String::new(),
                        ));
                    }
                    calls[i]
                        .1
                        .push_str(d["function"]["arguments"].as_str().unwrap_or(""));
                }
            }
            calls
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
            v["choices"][0]["message"]["tool_calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["function"]["name"].as_str().unwrap().into(),
                        c["function"]["arguments"].as_str().unwrap().into(),
                    )
                })
                .collect()
        };
        let expected_n = if model == "tools" { 1 } else { 2 };
        assert_eq!(calls.len(), expected_n, "{model} stream={stream}");
        assert_eq!(
            calls[0],
            (
                "get_weather".to_string(),
                r#"{"city": "Paris"}"#.to_string()
            )
        );
    }
    assert!(gw.stop().success());
    let db = gw.db();
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM tool_calls", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1 + 1 + 2 + 2);
    let streamed_parallel: Vec<(String, String, i64)> = db
        .prepare("SELECT t.name, t.arguments, t.arguments_valid_json FROM tool_calls t JOIN traffic r ON r.id = t.traffic_id WHERE r.route = 'parallel' AND r.stream = 1 ORDER BY t.call_index")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        streamed_parallel[0],
        ("get_weather".into(), r#"{"city": "Paris"}"#.into(), 1)
    );
    assert_eq!(
        streamed_parallel[1],
        ("get_time".into(), r#"{"tz": "Europe/Paris"}"#.into(), 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failing_mid_stream_sends_an_error_event_then_done() {
    let (_mock, mut gw) = start().await;
    for model in ["midstream-fail", "truncated"] {
        let mut body = user_request(model, "a b c");
        body["stream"] = json!(true);
        let resp = post(&gw, &body).await;
        assert_eq!(resp.status(), 200, "{model}: the stream had begun");
        let events = sse_events(&resp.text().await.unwrap());
        assert_eq!(events.last().unwrap(), "[DONE]", "{model}");
        let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_envelope(&err);
        assert_eq!(
            err["error"]["code"], "upstream_invalid_response",
            "{model}: {err}"
        );
    }
    assert!(gw.stop().success());
    let statuses: Vec<i64> = gw
        .db()
        .prepare("SELECT status FROM traffic ORDER BY ts_ms")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(statuses, vec![502, 502]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_then_fallback_and_error_mapping() {
    let (mock, mut gw) = start().await;
    // 503 twice, then success: two retries.
    let r = post(&gw, &user_request("flaky", "x")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.count("flaky"), 3);
    // A champion that always fails: retried, then the fallback serves.
    let r = post(&gw, &user_request("fallback-route", "fb")).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "echo: fb");
    assert_eq!(
        mock.count("always-500"),
        3,
        "1 attempt + 2 retries before falling back"
    );
    // 429 from the upstream after its retries: 429 to the client.
    let r = post(&gw, &user_request("rate-limited", "x")).await;
    assert_eq!(r.status(), 429);
    assert_envelope(&r.json().await.unwrap());
    // An upstream 400 is the client's problem: its own envelope comes back, no retry.
    let r = post(&gw, &user_request("bad-request", "x")).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upstream_specific");
    assert_eq!(mock.count("bad-request"), 1);
    // Garbage and the wrong content type: 502.
    let s = post(&gw, &user_request("garbage", "x")).await;
    assert_eq!(s.status(), 502);
    assert_envelope(&s.json().await.unwrap());
    let mut body = user_request("wrong-ctype", "x");
    body["stream"] = json!(true);
    let r = post(&gw, &body).await;
    assert_eq!(r.status(), 502);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("content-type"),
        "{v}"
    );
    // A hung upstream: 504 after the first-byte timeout.
    let r = post(&gw, &user_request("hang", "x")).await;
    assert_eq!(r.status(), 504);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "upstream_timeout"
    );
    assert!(gw.stop().success());
    let attempts: i64 = gw
        .db()
        .query_row(
            "SELECT attempts FROM traffic WHERE route = 'fallback-route'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_openai_errors() {
    let (mock, mut gw) = start().await;
    let cases: Vec<(&'static str, u16, Option<&str>)> = vec![
        ("{\"model\": \"echo\", \"messages\": [", 400, None),
        ("[1, 2]", 400, None),
        ("{\"model\": \"echo\"}", 400, Some("messages")),
        ("{\"model\": \"echo\", \"messages\": \"hi\"}", 400, Some("messages")),
        ("{\"model\": \"echo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"temperature\": \"hot\"}", 400, Some("temperature")),
        ("{\"model\": \"echo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"has space\"}}]}", 400, Some("tools[0].function.name")),
        ("{\"model\": \"echo\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"tools\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"type\": \"dict\"}}}]}", 400, Some("tools[0].function.parameters")),
        ("{\"model\": \"nope\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}", 404, Some("model")),
        ("{\"model\": \"single-n\", \"messages\": [{\"role\": \"user\", \"content\": \"x\"}], \"n\": 3}", 400, Some("n")),
    ];
    for (body, status, param) in cases {
        let (s, v) = post_raw(&gw, body).await;
        assert_eq!(s, status, "{body} -> {v}");
        assert_envelope(&v);
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{body}");
        }
    }
    // Oversized body: 413 (the default limit is 8 MiB).
    let big = json!({"model": "echo", "messages": [{"role": "user", "content": "x".repeat(9 * 1024 * 1024)}]});
    let r = post(&gw, &big).await;
    assert_eq!(r.status(), 413);
    assert_envelope(&r.json().await.unwrap());
    // Unknown URL and wrong method are envelopes too.
    let r = reqwest::get(gw.url("/v1/nothing")).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_envelope(&r.json().await.unwrap());
    let r = reqwest::get(gw.url("/v1/chat/completions")).await.unwrap();
    assert_eq!(r.status(), 405);
    assert_envelope(&r.json().await.unwrap());
    // None of it reached the upstream, and the server is still healthy.
    assert_eq!(mock.state.requests.lock().unwrap().len(), 0);
    assert_eq!(
        reqwest::get(gw.url("/healthz")).await.unwrap().status(),
        200
    );
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_split_is_sticky_and_close_to_its_percentage() {
    let mock = MockUpstream::start().await;
    let mut gw = canary_gateway(&mock, 30.0);
    let client = reqwest::Client::new();
    let mut canary = 0;
    let users = 300;
    for u in 0..users {
        let mut body = user_request("agent", "hi");
        body["user"] = json!(format!("user-{u}"));
        let mut arms = Vec::new();
        for _ in 0..2 {
            let r = client
                .post(gw.url("/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            arms.push(r.headers()["x-flywheel-arm"].to_str().unwrap().to_string());
        }
        assert_eq!(arms[0], arms[1], "user-{u} switched arms");
        if arms[0] == "canary" {
            canary += 1;
        }
    }
    let share = canary as f64 / users as f64;
    assert!((0.22..=0.38).contains(&share), "canary share {share}");
    // The session header is sticky too.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..5 {
        let r = client
            .post(gw.url("/v1/chat/completions"))
            .header("x-session-id", "session-42")
            .json(&user_request("agent", "hi"))
            .send()
            .await
            .unwrap();
        seen.insert(r.headers()["x-flywheel-arm"].to_str().unwrap().to_string());
    }
    assert_eq!(seen.len(), 1);
    assert!(gw.stop().success());
    let logged_canary: i64 = gw
        .db()
        .query_row(
            "SELECT COUNT(*) FROM traffic WHERE arm = 'canary'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(logged_canary >= 2 * canary as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_requests_are_logged_beside_the_primary_with_agreement() {
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml(
        "same",
        "mock",
        "tools",
        "shadow = { target = { upstream = \"mock\", model = \"parallel\" }, sample_rate = 1.0 }",
    ));
    config.push_str(&route_toml(
        "differ",
        "mock",
        "tools",
        "shadow = { target = { upstream = \"mock\", model = \"tools-alt\" }, sample_rate = 1.0 }",
    ));
    config.push_str(&route_toml(
        "agree",
        "mock",
        "parallel",
        "shadow = { target = { upstream = \"mock\", model = \"parallel\" }, sample_rate = 1.0 }",
    ));
    let mut gw = GatewayProcess::start(&config);
    for route in ["same", "differ", "agree"] {
        let mut body = user_request(route, "weather?");
        body["tools"] = weather_tools();
        body["stream"] = json!(route == "agree");
        let r = post(&gw, &body).await;
        assert_eq!(r.status(), 200);
        let _ = r.text().await.unwrap();
    }
    // Shadows run off the response path; shutdown waits for them.
    assert!(gw.stop().success());
    let db = gw.db();
    let rows: Vec<(String, Option<i64>, Option<i64>)> = db
        .prepare(
            "SELECT p.route, s.tool_name_agreement, s.tool_args_agreement FROM traffic s JOIN traffic p ON p.id = s.shadow_of
             WHERE s.arm = 'shadow' ORDER BY p.route",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        rows,
        vec![
            ("agree".to_string(), Some(1), Some(1)),
            ("differ".to_string(), Some(1), Some(0)),
            ("same".to_string(), Some(0), Some(0)),
        ]
    );
    // The shadow's request went out non-streaming with the shadow's model.
    assert!(mock
        .requests_for("tools-alt")
        .iter()
        .all(|(_, b)| b["stream"] == false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_scopes_and_runtime_rollout_changes() {
    let mock = MockUpstream::start().await;
    let mut config = keyed_auth_toml();
    config.push_str(&upstream_toml("mock", &mock.base_url(), ""));
    config.push_str(&route_toml("agent", "mock", "slow", ""));
    let mut gw = GatewayProcess::start(&config);
    let client = reqwest::Client::new();
    let chat = |key: Option<&'static str>| {
        let mut rb = client
            .post(gw.url("/v1/chat/completions"))
            .json(&user_request("agent", "hi"));
        if let Some(k) = key {
            rb = rb.bearer_auth(k);
        }
        rb.send()
    };
    assert_eq!(chat(None).await.unwrap().status(), 401);
    let r = chat(Some("sk-wrong")).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_envelope(&r.json().await.unwrap());
    assert_eq!(chat(Some("sk-agent")).await.unwrap().status(), 200);
    let r = client
        .get(gw.url("/admin/routes"))
        .bearer_auth("sk-agent")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_envelope(&r.json().await.unwrap());
    let r = client
        .get(gw.url("/admin/routes"))
        .bearer_auth("sk-admin")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["data"][0]["champion"]["model"], "slow");

    // A slow request in flight keeps its target while the rollout changes under it.
    let in_flight = tokio::spawn(chat(Some("sk-agent")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = client
        .put(gw.url("/admin/routes/agent"))
        .bearer_auth("sk-admin")
        .json(&json!({"champion": {"upstream": "mock", "model": "echo"}, "canary": null, "fallbacks": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let old = in_flight.await.unwrap().unwrap();
    assert_eq!(old.status(), 200);
    assert_eq!(old.json::<Value>().await.unwrap()["model"], "slow");
    let new: Value = chat(Some("sk-agent")).await.unwrap().json().await.unwrap();
    assert_eq!(new["model"], "echo");
    // An invalid rollout is refused and changes nothing.
    let r = client
        .put(gw.url("/admin/routes/agent"))
        .bearer_auth("sk-admin")
        .json(&json!({"champion": {"upstream": "nowhere", "model": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("nowhere"));
    let new: Value = chat(Some("sk-agent")).await.unwrap().json().await.unwrap();
    assert_eq!(new["model"], "echo");
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_every_answered_request_into_the_log() {
    let (_mock, mut gw) = start().await;
    let n = 40;
    let client = reqwest::Client::new();
    let mut handles = Vec::new();
    for i in 0..n {
        let client = client.clone();
        let url = gw.url("/v1/chat/completions");
        let mut body = user_request("slow", &format!("req {i}"));
        body["stream"] = json!(i % 2 == 0);
        handles.push(tokio::spawn(async move {
            let r = client.post(url).json(&body).send().await?;
            let status = r.status().as_u16();
            r.text().await?;
            Ok::<u16, reqwest::Error>(status)
        }));
    }
    // All requests are in flight at the upstream (which takes 300 ms) when SIGTERM arrives.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = gw.stop();
        (s, gw)
    });
    let mut answered = 0;
    for h in handles {
        if let Ok(Ok(200)) = h.await {
            answered += 1;
        }
    }
    let (exit, gw) = status.await.unwrap();
    assert!(exit.success());
    assert_eq!(answered, n, "in-flight requests were finished, not dropped");
    let logged: i64 = gw
        .db()
        .query_row("SELECT COUNT(*) FROM traffic WHERE status = 200", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(logged, answered as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_the_upstream_stream() {
    let (mock, mut gw) = start().await;
    let mut body = user_request("endless", "go");
    body["stream"] = json!(true);
    let mut resp = post(&gw, &body).await;
    assert_eq!(resp.status(), 200);
    let mut got = 0;
    while got < 3 {
        if resp.chunk().await.unwrap().is_some() {
            got += 1;
        }
    }
    drop(resp);
    let mut cancelled = false;
    for _ in 0..100 {
        if mock
            .state
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
        {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        cancelled,
        "the upstream stream kept running after the client left"
    );
    assert!(gw.stop().success());
    let status: i64 = gw
        .db()
        .query_row("SELECT status FROM traffic", [], |r| r.get(0))
        .unwrap();
    assert_eq!(status, 499);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_and_export() {
    let (_mock, mut gw) = start().await;
    let v: Value = reqwest::get(gw.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(
        ids.contains(&"echo") && ids.contains(&"fallback-route") && ids.contains(&"always-500")
    );
    assert_eq!(
        reqwest::get(gw.url("/v1/models/echo"))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(gw.url("/v1/models/nope"))
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(reqwest::get(gw.url("/readyz")).await.unwrap().status(), 200);
    let client = reqwest::Client::new();
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-workload-id", "export-wl")
        .header("x-client-id", "export-client")
        .json(&user_request("tools", "q"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let metrics = reqwest::get(gw.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "flywheel_requests_total",
        "flywheel_request_duration_seconds_bucket",
        "flywheel_time_to_first_token_seconds",
        "flywheel_gateway_overhead_seconds",
        "flywheel_log_queue_depth",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}:\n{metrics}");
    }
    assert!(gw.stop().success());
    let lines = export_records(&gw);
    assert_eq!(lines.len(), 1);
    let rec = &lines[0];
    assert!(rec["timestamp"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(rec["workload_id"], "export-wl");
    assert_eq!(rec["client_id"], "export-client");
    assert_eq!(rec["request"]["messages"][0]["content"], "q");
    assert_eq!(
        rec["response"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "get_weather"
    );
    assert_eq!(rec["tool_calls"][0]["name"], "get_weather");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_streaming_request_abandoned_by_its_client_is_still_recorded() {
    let (mock, mut gw) = start().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .json(&user_request("hang", "x"))
        .send()
        .await;
    assert!(r.is_err(), "the client gave up first");
    // Wait for the upstream to have seen it, then shut down.
    for _ in 0..40 {
        if mock.count("hang") > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gw.stop().success());
    let (status, request): (i64, String) = gw
        .db()
        .query_row(
            "SELECT status, request FROM traffic WHERE route = 'hang'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(status, 499);
    assert!(request.contains("\"hang\""));
}
