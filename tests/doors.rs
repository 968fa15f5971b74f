//! Every door an agent knocks on, driven by the real clients (the `openai` package, the
//! `openai-agents` SDK with its default settings, the `anthropic` package) against the real
//! binary, on the default model and through a mock upstream; then what each door left in the
//! traffic log, and bad input on each door in its own envelope.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

/// The local model as route `smol`, and routes to the mock upstream.
fn config(mock: &MockUpstream) -> String {
    let mut c = format!(
        "[[models]]\nname = \"smollm2\"\npath = \"{}\"\ncontext_length = 2048\n[[routes]]\nname = \"smol\"\nchampion = {{ local = \"smollm2\" }}\n",
        path_str(&default_model())
    );
    c.push_str(&upstream_toml("mock", &mock.base_url(), ""));
    for m in ["echo", "agent", "embedder"] {
        c.push_str(&route_toml(m, "mock", m, ""));
    }
    c
}

/// OpenAI's published OpenAPI document, kept beside the project (`../shared/openai/`). CI always
/// has it; elsewhere, without it, the event-by-event spec check is skipped and says so.
fn openapi_spec() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/openai/openapi.yaml");
    if p.exists() {
        return path_str(&p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "OpenAI's OpenAPI document is expected at {} in CI",
        p.display()
    );
    println!(
        "SKIPPED: stream events are not checked against OpenAI's OpenAPI document: none at {}",
        p.display()
    );
    String::new()
}

/// The pinned Python clients, the mock upstream, and a gateway on `config`.
async fn clients_and_gateway() -> (PathBuf, MockUpstream, GatewayProcess) {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mock = MockUpstream::start().await;
    let gw = GatewayProcess::start(&config(&mock));
    (python, mock, gw)
}

fn passed(stdout: &str) -> usize {
    stdout.lines().filter(|l| l.starts_with("ok: ")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_speaks_responses_completions_and_embeddings() {
    let (python, mock, mut gw) = clients_and_gateway().await;
    let spec = openapi_spec();
    let stdout = run_script(python, "doors_openai.py", &[gw.url("/v1"), spec]).await;
    println!("{stdout}");
    assert!(passed(&stdout) >= 40, "{stdout}");

    // text.format reached the upstream as the chat response_format it stands for.
    let formats: Vec<Value> = mock
        .requests_for("echo")
        .into_iter()
        .filter_map(|(_, b)| b.get("response_format").cloned())
        .collect();
    assert_eq!(formats.len(), 1, "{formats:?}");
    assert_eq!(formats[0]["type"], "json_schema");
    assert_eq!(formats[0]["json_schema"]["name"], "city");
    // The embeddings request went upstream as it was sent.
    assert_eq!(
        mock.requests_for("embedder")[0].1["input"],
        json!(["a", "bcd"])
    );

    assert!(gw.stop().success());
    let db = gw.db();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    // Responses rows keep the client's own body beside the chat exchange they were served as.
    assert!(count("SELECT COUNT(*) FROM traffic WHERE api = 'responses' AND status = 200") >= 10);
    assert_eq!(
        count("SELECT COUNT(*) FROM traffic WHERE api = 'responses' AND status = 200 AND (wire_request IS NULL OR json_extract(request, '$.messages') IS NULL)"),
        0
    );
    // Tool calls made through the Responses door are rows like any other.
    assert!(count("SELECT COUNT(*) FROM tool_calls t JOIN traffic r ON r.id = t.traffic_id WHERE r.api = 'responses' AND t.name = 'get_weather'") >= 3);
    // Refused requests are logged too, with their status.
    assert!(count("SELECT COUNT(*) FROM traffic WHERE api = 'responses' AND status = 400") >= 5);
    assert!(count("SELECT COUNT(*) FROM traffic WHERE api = 'completions' AND status = 200") >= 5);
    // Embeddings are logged without their vectors.
    let logged: String = db
        .query_row(
            "SELECT response FROM traffic WHERE api = 'embeddings' AND status = 200",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let logged: Value = serde_json::from_str(&logged).unwrap();
    assert!(logged["data"][0].get("embedding").is_none(), "{logged}");
    assert_eq!(logged["data"][1]["embedding_size"]["dimensions"], 4);
    // Stored responses are whole rows: every one parses and belongs to a traffic row.
    let orphans = count(
        "SELECT COUNT(*) FROM responses s LEFT JOIN traffic t ON t.id = s.traffic_id WHERE t.id IS NULL OR json_valid(s.response) = 0 OR json_valid(s.conversation) = 0",
    );
    assert_eq!(orphans, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_client_speaks_messages_locally_and_through_an_upstream() {
    let (python, mock, mut gw) = clients_and_gateway().await;
    let stdout = run_script(python, "doors_anthropic.py", &[gw.url("")]).await;
    println!("{stdout}");
    assert!(passed(&stdout) >= 15, "{stdout}");
    // The tool_result turn reached the upstream as a chat tool message answering the call.
    let second = mock
        .requests_for("agent")
        .into_iter()
        .map(|(_, b)| b)
        .find(|b| {
            b["messages"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["role"] == "tool")
        })
        .expect("a tool_result turn");
    let tool = second["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["role"] == "tool")
        .unwrap();
    assert_eq!(tool["content"], "sunny");
    assert!(gw.stop().success());
    let n: i64 = gw
        .db()
        .query_row(
            "SELECT COUNT(*) FROM traffic WHERE api = 'messages' AND status = 200 AND wire_request IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(n >= 8, "{n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_agents_sdk_agent_calls_its_tool_locally_and_through_an_upstream() {
    let (python, _mock, mut gw) = clients_and_gateway().await;
    let stdout = run_script(python, "doors_agents.py", &[gw.url("/v1")]).await;
    println!("{stdout}");
    assert!(passed(&stdout) >= 5, "{stdout}");
    assert!(gw.stop().success());
    // The SDK spoke the Responses API (its default), and every turn was logged.
    let (responses, other): (i64, i64) = gw
        .db()
        .query_row(
            "SELECT SUM(api = 'responses'), SUM(api != 'responses') FROM traffic",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(responses >= 5, "{responses}");
    assert_eq!(other, 0);
}

async fn post(url: String, body: Value, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut r = reqwest::Client::new().post(url).json(&body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_door_refuses_bad_input_in_its_own_envelope_and_never_with_a_5xx() {
    let mock = MockUpstream::start().await;
    let key = "sk-doors-test";
    let digest = flywheel::api::auth::hash_key(key);
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml("echo", "mock", "echo", ""));
    config.push_str(&format!(
        "[auth]\nallow_loopback_without_key = false\n[[auth.keys]]\nname = \"team\"\nsha256 = \"{digest}\"\nscopes = [\"inference\"]\n"
    ));
    let gw = GatewayProcess::start(&config);
    let bearer = format!("Bearer {key}");
    let auth = [("authorization", bearer.as_str())];

    // Anthropic's door: its envelope, its key header, the field named in the message.
    let (st, v) = post(
        gw.url("/v1/messages"),
        json!({"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(
        (st, v["type"].as_str(), v["error"]["type"].as_str()),
        (401, Some("error"), Some("authentication_error")),
        "{v}"
    );
    let (st, v) = post(
        gw.url("/v1/messages"),
        json!({"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        &[("x-api-key", key), ("anthropic-version", "2023-06-01")],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["content"][0]["text"], "echo: hi");
    let bad_messages = [
        json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "x"}]}]}),
        json!({"model": "echo", "max_tokens": 5, "messages": "hi"}),
        json!({"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "mystery"}]}]}),
        json!({"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "f", "input_schema": "nope"}]}),
        json!({"model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool", "name": "ghost"}}),
    ];
    for body in bad_messages {
        let (st, v) = post(gw.url("/v1/messages"), body.clone(), &[("x-api-key", key)]).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    let (st, v) = post(
        gw.url("/v1/messages"),
        json!({"model": "nope", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}),
        &[("x-api-key", key)],
    )
    .await;
    assert_eq!(
        (st, v["error"]["type"].as_str()),
        (404, Some("not_found_error")),
        "{v}"
    );

    // The Responses door: OpenAI's envelope with the param path.
    let bad_responses = [
        (json!({"model": "echo"}), "input"),
        (
            json!({"model": "echo", "input": [{"type": "item_reference", "id": "x"}]}),
            "input[0]",
        ),
        (
            json!({"model": "echo", "input": [{"type": "message", "role": "robot", "content": "x"}]}),
            "input[0].role",
        ),
        (
            json!({"model": "echo", "input": "x", "tools": [{"type": "file_search"}]}),
            "tools[0].type",
        ),
        (
            json!({"model": "echo", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "bogus"}}]}),
            "tools[0].parameters",
        ),
        (
            json!({"model": "echo", "input": "x", "text": {"format": {"type": "json_schema", "schema": {}}}}),
            "text.format.name",
        ),
        (
            json!({"model": "echo", "input": "x", "max_output_tokens": 0}),
            "max_output_tokens",
        ),
        (
            json!({"model": "echo", "input": "x", "previous_response_id": "resp_missing"}),
            "previous_response_id",
        ),
    ];
    for (body, param) in bad_responses {
        let (st, v) = post(gw.url("/v1/responses"), body.clone(), &auth).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // A stored response belongs to the key that made it: without the key nothing is visible.
    let (st, v) = post(
        gw.url("/v1/responses"),
        json!({"model": "echo", "input": "remember me"}),
        &auth,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    let got = reqwest::Client::new()
        .get(gw.url(&format!("/v1/responses/{id}")))
        .header("authorization", &bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let got = reqwest::Client::new()
        .get(gw.url(&format!("/v1/responses/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 401);

    // Completions and embeddings: OpenAI's envelope.
    for (path, body, param) in [
        ("/v1/completions", json!({"model": "echo"}), "prompt"),
        (
            "/v1/completions",
            json!({"model": "echo", "prompt": [1, "x"]}),
            "prompt",
        ),
        (
            "/v1/embeddings",
            json!({"model": "echo", "input": {"x": 1}}),
            "input",
        ),
        (
            "/v1/embeddings",
            json!({"model": "echo", "input": "x", "encoding_format": "int4"}),
            "encoding_format",
        ),
    ] {
        let (st, v) = post(gw.url(path), body.clone(), &auth).await;
        assert_eq!(st, 400, "{path} {body}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // Malformed JSON on every door is a 400 in that door's envelope.
    for path in [
        "/v1/responses",
        "/v1/messages",
        "/v1/completions",
        "/v1/embeddings",
    ] {
        let r = reqwest::Client::new()
            .post(gw.url(path))
            .header("authorization", &bearer)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let v: Value = r.json().await.unwrap();
        if path == "/v1/messages" {
            assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        } else {
            assert_eq!(v["error"]["code"], "invalid_json", "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_breaks_ends_with_each_doors_failure_event() {
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml("midstream-fail", "mock", "midstream-fail", ""));
    let gw = GatewayProcess::start(&config);
    let body = reqwest::Client::new()
        .post(gw.url("/v1/responses"))
        .json(&json!({"model": "midstream-fail", "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.starts_with("event: response.created"), "{body}");
    assert!(body.trim_end().ends_with('}'), "{body}");
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: response.failed"), "{body}");
    let data: Value = serde_json::from_str(last.split("data: ").nth(1).unwrap()).unwrap();
    assert_eq!(data["response"]["status"], "failed");
    assert!(
        data["response"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mock"),
        "{data}"
    );

    let body = reqwest::Client::new()
        .post(gw.url("/v1/messages"))
        .json(&json!({"model": "midstream-fail", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.starts_with("event: message_start"), "{body}");
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error"), "{body}");
    let data: Value = serde_json::from_str(last.split("data: ").nth(1).unwrap()).unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "api_error");
}

/// `(status, body text)` of a POST.
async fn post_text(url: String, body: Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The `(event name, data)` pairs of a named-event stream.
fn named_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            let name = b.lines().find_map(|l| l.strip_prefix("event: ")).unwrap();
            let data = b.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            (name.to_string(), serde_json::from_str(data).unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_speaks_responses_and_messages_natively_gets_them_unchanged() {
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml(
        "speaks",
        &mock.base_url(),
        "api_key_env = \"NATIVE_TEST_KEY\"\nnative_apis = [\"responses\", \"messages\"]",
    );
    config.push_str(&upstream_toml("chat-only", &mock.base_url(), ""));
    for m in ["native", "native-fail"] {
        config.push_str(&route_toml(m, "speaks", m, ""));
    }
    config.push_str(&route_toml("echo", "chat-only", "echo", ""));
    let mut gw = GatewayProcess::start_with_env(&config, &[("NATIVE_TEST_KEY", "sk-upstream")]);

    // Responses, whole: the upstream's answer with this gateway's id, stored here.
    let (st, v) = post(
        gw.url("/v1/responses"),
        json!({"model": "native", "input": "hello"}),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["output"][0]["content"][0]["text"], "native: hello");
    let id = v["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("resp_") && id != "resp_upstream", "{id}");
    assert_eq!(v["store"], true);
    let sent = &mock.requests_for("native")[0].1;
    assert_eq!(
        sent["store"], false,
        "the upstream is asked not to keep state: {sent}"
    );
    assert_eq!(sent["input"], "hello");

    // A continuation reaches the upstream as the whole conversation, not as an id it never saw.
    let (st, v) = post(
        gw.url("/v1/responses"),
        json!({"model": "native", "previous_response_id": id, "input": "again"}),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["previous_response_id"], id.as_str());
    let sent = &mock.requests_for("native")[1].1;
    assert!(sent.get("previous_response_id").is_none(), "{sent}");
    let input = sent["input"].as_array().unwrap();
    assert_eq!(input.len(), 3, "{sent}");
    assert_eq!(
        (input[0]["role"].as_str(), input[0]["content"].as_str()),
        (Some("user"), Some("hello"))
    );
    assert_eq!(
        (input[1]["role"].as_str(), input[1]["content"].as_str()),
        (Some("assistant"), Some("native: hello"))
    );
    assert_eq!(input[2]["content"], "again");

    // Streamed: the upstream's events, renamed to this gateway's response, then stored.
    let (st, body) = post_text(
        gw.url("/v1/responses"),
        json!({"model": "native", "input": "streamed", "stream": true}),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let events = named_events(&body);
    assert_eq!(events.first().unwrap().0, "response.created");
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "response.completed");
    let streamed_id = data["response"]["id"].as_str().unwrap();
    assert_ne!(streamed_id, "resp_upstream");
    let text: String = events
        .iter()
        .filter(|(k, _)| k == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(text, "native: streamed");
    let stored = reqwest::get(gw.url(&format!("/v1/responses/{streamed_id}")))
        .await
        .unwrap();
    assert_eq!(stored.status(), 200);
    // A native stream that fails ends with this gateway's response.failed.
    let (_, body) = post_text(
        gw.url("/v1/responses"),
        json!({"model": "native-fail", "input": "x", "stream": true}),
    )
    .await;
    let events = named_events(&body);
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "response.failed", "{body}");
    assert!(
        data["response"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream gave up"),
        "{data}"
    );
    assert_eq!(data["sequence_number"], events.len() as u64 - 1);

    // Messages, whole and streamed, with Anthropic's headers on the way up.
    let ask = json!({"model": "native", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]});
    let (st, v) = post(gw.url("/v1/messages"), ask.clone(), &[]).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["id"].as_str(), v["content"][0]["text"].as_str()),
        (Some("msg_upstream"), Some("native: hi"))
    );
    let (headers, _) = mock.requests_for("native").pop().unwrap();
    assert_eq!(headers["x-api-key"], "sk-upstream");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    let (_, body) = post_text(gw.url("/v1/messages"), streamed).await;
    let kinds: Vec<String> = named_events(&body).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("message_start"));
    assert_eq!(kinds.last().map(String::as_str), Some("message_stop"));

    // An upstream without native_apis still gets the translation.
    let (st, v) = post(
        gw.url("/v1/responses"),
        json!({"model": "echo", "input": "translated"}),
        &[],
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["output"][0]["content"][0]["text"], "echo: translated");
    assert_eq!(mock.count("echo"), 1);

    // The log keeps every native answer as the chat completion it stands for.
    assert!(gw.stop().success());
    let db = gw.db();
    let mut stmt = db
        .prepare("SELECT api, response FROM traffic WHERE target_model = 'native' AND status = 200 ORDER BY ts_ms")
        .unwrap();
    let rows: Vec<(String, Value)> = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                serde_json::from_str(&r.get::<_, String>(1)?).unwrap(),
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let texts: Vec<(&str, &str)> = rows
        .iter()
        .map(|(api, r)| {
            (
                api.as_str(),
                r["choices"][0]["message"]["content"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        texts,
        [
            ("responses", "native: hello"),
            ("responses", "native: again"),
            ("responses", "native: streamed"),
            ("messages", "native: hi"),
            ("messages", "native: hi"),
        ]
    );
    assert_eq!(rows[0].1["usage"]["total_tokens"], 8);
}
