//! Episodes and feedback over real HTTP: episode ids minted, returned and stored; a canary sticky
//! per episode and drawn per request without one; `POST /v1/feedback` taken while the batched
//! traffic writer has not yet written the request, checked field by field, and listed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};

const METRICS: &str = r#"
[[metrics]]
name = "thumbs_up"
type = "boolean"

[[metrics]]
name = "rating"
type = "float"
level = "request"

[[metrics]]
name = "task_success"
type = "boolean"
level = "episode"
"#;

async fn chat(
    client: &reqwest::Client,
    gw: &GatewayProcess,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = client.post(gw.url("/v1/chat/completions")).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()[name].to_str().unwrap().to_string()
}

async fn feedback(client: &reqwest::Client, gw: &GatewayProcess, body: Value) -> (u16, Value) {
    let r = client
        .post(gw.url("/v1/feedback"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn episodes_are_minted_returned_stored_and_keep_a_canary_sticky() {
    let mock = MockUpstream::start().await;
    let mut gw = canary_gateway(&mock, 50.0);
    let client = reqwest::Client::new();

    // Without an episode, one is minted and returned.
    let r = chat(&client, &gw, &user_request("agent", "hi"), &[]).await;
    assert_eq!(r.status(), 200);
    let minted = header(&r, "x-episode-id");
    uuid::Uuid::parse_str(&minted).unwrap();
    let minted_request = header(&r, "x-request-id");

    // An episode stays on one arm, from the header or from `metadata`.
    let mut arms = std::collections::HashSet::new();
    for _ in 0..6 {
        let r = chat(
            &client,
            &gw,
            &user_request("agent", "hi"),
            &[("x-episode-id", "task-7")],
        )
        .await;
        assert_eq!(header(&r, "x-episode-id"), "task-7");
        arms.insert(header(&r, "x-flywheel-arm"));
    }
    assert_eq!(arms.len(), 1, "one episode switched arms: {arms:?}");
    let mut body = user_request("agent", "hi");
    body["metadata"] = json!({"episode_id": "task-8"});
    let r = chat(&client, &gw, &body, &[]).await;
    assert_eq!(header(&r, "x-episode-id"), "task-8");

    // Traffic labelled only with a workload is drawn request by request: the canary gets close to
    // its share instead of all or nothing.
    let n = 200;
    let mut canary = 0;
    for _ in 0..n {
        let r = chat(
            &client,
            &gw,
            &user_request("agent", "hi"),
            &[("x-workload-id", "w1")],
        )
        .await;
        if header(&r, "x-flywheel-arm") == "canary" {
            canary += 1;
        }
    }
    let share = f64::from(canary) / f64::from(n);
    assert!(
        (0.38..=0.62).contains(&share),
        "canary share {share} on workload-only traffic"
    );

    // A malformed episode id is refused in the envelope, naming the header.
    let long = "x".repeat(300);
    let r = chat(
        &client,
        &gw,
        &user_request("agent", "hi"),
        &[("x-episode-id", &long)],
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "x-episode-id");

    assert!(gw.stop().success());
    let conn = gw.db();
    let stored: String = conn
        .query_row(
            "SELECT episode_id FROM traffic WHERE id = ?1",
            [&minted_request],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, minted);
    let task7: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM traffic WHERE episode_id = 'task-7'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(task7, 6);
    let workload_episodes: i64 = conn
        .query_row(
            "SELECT COUNT(DISTINCT episode_id) FROM traffic WHERE workload_id = 'w1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        workload_episodes,
        i64::from(n),
        "each unlabelled request is its own episode"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_is_taken_before_the_log_writes_its_request_checked_and_listed() {
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml("agent", "mock", "tools", ""));
    // A slow writer: the request's row is still queued when the feedback arrives.
    config.push_str("[log]\nflush_interval_ms = 700\nbatch_size = 4096\n");
    config.push_str(METRICS);
    let mut gw = GatewayProcess::start(&config);
    let client = reqwest::Client::new();

    let mut body = user_request("agent", "weather in Paris?");
    body["tools"] = weather_tools();
    let r = chat(&client, &gw, &body, &[("x-episode-id", "trip-1")]).await;
    assert_eq!(r.status(), 200);
    let request_id = header(&r, "x-request-id");

    // At once: the row is not written yet, and the feedback is taken all the same.
    let (status, fb) = feedback(
        &client,
        &gw,
        json!({"metric": "thumbs_up", "value": false, "request_id": request_id, "comment": "wrong city"}),
    )
    .await;
    assert_eq!(status, 201, "{fb}");
    assert_eq!(fb["object"], "feedback");
    assert_eq!(fb["value"], 0.0);
    assert_eq!(fb["key_name"], "loopback");

    // Repeated feedback for the same metric is kept; a number; a demonstration of the right call.
    let (status, _) = feedback(
        &client,
        &gw,
        json!({"metric": "thumbs_up", "value": true, "request_id": request_id}),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = feedback(
        &client,
        &gw,
        json!({"metric": "rating", "value": 4.5, "request_id": request_id}),
    )
    .await;
    assert_eq!(status, 201);
    let (status, demo) = feedback(
        &client,
        &gw,
        json!({"request_id": request_id, "demonstration": {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Lyon"}}}]}}),
    )
    .await;
    assert_eq!(status, 201, "{demo}");
    let args = demo["demonstration"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(args).unwrap(),
        json!({"city": "Lyon"})
    );
    let (status, _) = feedback(
        &client,
        &gw,
        json!({"metric": "task_success", "value": true, "episode_id": "trip-1"}),
    )
    .await;
    assert_eq!(status, 201);

    // Bad input: each refusal names its field.
    let refused = [
        (
            json!({"metric": "stars", "value": 1, "request_id": request_id}),
            400,
            "metric",
        ),
        (
            json!({"metric": "thumbs_up", "value": 3, "request_id": request_id}),
            400,
            "value",
        ),
        (
            json!({"metric": "rating", "value": "high", "request_id": request_id}),
            400,
            "value",
        ),
        (
            json!({"metric": "task_success", "value": true, "request_id": request_id}),
            400,
            "episode_id",
        ),
        (
            json!({"metric": "thumbs_up", "value": true, "request_id": "not-an-id"}),
            400,
            "request_id",
        ),
        (
            json!({"metric": "thumbs_up", "valeu": true, "request_id": request_id}),
            400,
            "valeu",
        ),
        (
            json!({"metric": "thumbs_up", "value": true}),
            400,
            "request_id",
        ),
        (json!({"request_id": request_id}), 400, "metric"),
        (
            json!({"request_id": request_id, "demonstration": {"tool_calls": [
                {"function": {"name": "launch_rockets", "arguments": "{}"}}]}}),
            400,
            "demonstration.tool_calls[0].function.name",
        ),
        (
            json!({"request_id": request_id, "demonstration": {"tool_calls": [
                {"function": {"name": "get_time", "arguments": "{not json"}}]}}),
            400,
            "demonstration.tool_calls[0].function.arguments",
        ),
        (
            json!({"episode_id": "trip-1", "demonstration": {"content": "hi"}}),
            400,
            "demonstration",
        ),
        (
            json!({"metric": "thumbs_up", "value": true, "request_id": uuid::Uuid::now_v7().to_string()}),
            404,
            "request_id",
        ),
        (
            json!({"metric": "task_success", "value": true, "episode_id": "no-such-trip"}),
            404,
            "episode_id",
        ),
    ];
    for (body, status, param) in refused {
        let (got, e) = feedback(&client, &gw, body.clone()).await;
        assert_eq!(got, status, "{body} -> {e}");
        assert_eq!(e["error"]["param"], param, "{body} -> {e}");
    }

    // Listed with the request (oldest first) and with its episode.
    let list = |q: String| {
        let client = client.clone();
        let url = gw.url(&format!("/v1/feedback?{q}"));
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let of_request = list(format!("request_id={request_id}")).await;
    let kinds: Vec<Value> = of_request["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| json!([f["metric"], f["value"]]))
        .collect();
    assert_eq!(
        kinds,
        vec![
            json!(["thumbs_up", 0.0]),
            json!(["thumbs_up", 1.0]),
            json!(["rating", 4.5]),
            json!([null, null]),
        ]
    );
    let of_episode = list("episode_id=trip-1".into()).await;
    assert_eq!(of_episode["data"].as_array().unwrap().len(), 5);

    assert!(gw.stop().success());
    let rows: i64 = gw
        .db()
        .query_row("SELECT COUNT(*) FROM feedback", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 5, "every accepted piece is kept, nothing refused is");
    // The export carries each request's feedback beside it.
    let record = export_records(&gw).remove(0);
    assert_eq!(record["episode_id"], "trip-1");
    assert_eq!(
        record["feedback"].as_array().unwrap().len(),
        4,
        "{record:#}"
    );
    assert_eq!(record["feedback"][0]["comment"], "wrong city");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_without_a_traffic_log_is_refused_as_unavailable() {
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml("agent", "mock", "echo", ""));
    config.push_str("[log]\nenabled = false\n");
    config.push_str(METRICS);
    let mut gw = GatewayProcess::start(&config);
    let client = reqwest::Client::new();
    let r = chat(&client, &gw, &user_request("agent", "hi"), &[]).await;
    let id = header(&r, "x-request-id");
    let (status, e) = feedback(
        &client,
        &gw,
        json!({"metric": "thumbs_up", "value": true, "request_id": id}),
    )
    .await;
    assert_eq!(status, 503, "{e}");
    assert_eq!(e["error"]["code"], "feedback_unavailable", "{e}");
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_names_a_stream_still_running_and_a_request_that_failed() {
    let mock = MockUpstream::start().await;
    let mut config = upstream_toml("mock", &mock.base_url(), "");
    config.push_str(&route_toml("chatty", "mock", "endless", ""));
    config.push_str(&route_toml("refusing", "mock", "bad-request", ""));
    config.push_str(METRICS);
    let mut gw = GatewayProcess::start(&config);
    let client = reqwest::Client::new();

    // A stream that has not ended (its row is written when it does): its id is known at once.
    let mut body = user_request("chatty", "talk to me");
    body["stream"] = json!(true);
    let mut stream = chat(&client, &gw, &body, &[("x-episode-id", "long-talk")]).await;
    assert_eq!(stream.status(), 200);
    let streaming_id = header(&stream, "x-request-id");
    assert!(stream.chunk().await.unwrap().is_some(), "the stream runs");
    let (status, fb) = feedback(
        &client,
        &gw,
        json!({"metric": "rating", "value": 2, "request_id": streaming_id}),
    )
    .await;
    assert_eq!(status, 201, "{fb}");
    let (status, fb) = feedback(
        &client,
        &gw,
        json!({"metric": "task_success", "value": false, "episode_id": "long-talk"}),
    )
    .await;
    assert_eq!(status, 201, "{fb}");
    // The client leaves mid-stream: the row says so (499).
    drop(stream);

    // A failed request names its record and episode too, in the error's headers.
    let r = chat(
        &client,
        &gw,
        &user_request("refusing", "hello"),
        &[("x-episode-id", "refused-task")],
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-episode-id"), "refused-task");
    let failed_id = header(&r, "x-request-id");
    let (status, fb) = feedback(
        &client,
        &gw,
        json!({"metric": "thumbs_up", "value": false, "request_id": failed_id, "comment": "it refused"}),
    )
    .await;
    assert_eq!(status, 201, "{fb}");

    assert!(gw.stop().success());
    let db = gw.db();
    for (id, status) in [(&streaming_id, 499), (&failed_id, 400)] {
        let (logged, feedback): (i64, i64) = db
            .query_row(
                "SELECT t.status, (SELECT COUNT(*) FROM feedback f WHERE f.request_id = t.id)
                 FROM traffic t WHERE t.id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((logged, feedback), (status, 1), "{id}");
    }
}
