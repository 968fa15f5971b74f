//! The embedded engine behind the gateway, on the real default model (SmolLM2-135M-Instruct Q4_1,
//! fetched by scripts/fetch-model.sh on first run) and on a tiny random model.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn local_config(path: &Path, extra: &str) -> String {
    format!(
        "[[models]]\nname = \"smollm2\"\npath = \"{}\"\ncontext_length = 512\n{extra}\n[[routes]]\nname = \"smol\"\nchampion = {{ local = \"smollm2\" }}\n",
        path_str(path)
    )
}

async fn ask(gw: &GatewayProcess, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_answers_coherently_streams_and_batches() {
    let path = tokio::task::spawn_blocking(default_model).await.unwrap();
    let mut gw = GatewayProcess::start(&local_config(&path, ""));
    // Greedy decoding of a fixed prompt: the model's answer is deterministic and on topic.
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0, "max_tokens": 30});
    let (status, v) = ask(&gw, body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains('4'), "incoherent answer: {text:?}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let (_, again) = ask(&gw, body.clone()).await;
    assert_eq!(
        again["choices"][0]["message"]["content"],
        text.as_str(),
        "greedy decoding is deterministic"
    );

    // The same through SSE: the chunks reassemble to the same text; usage only when asked.
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&sbody)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let events = sse_events(&r.text().await.unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    assert!(
        chunks.last().unwrap()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    // Concurrent requests share decode steps and all finish, each with its own answer.
    let prompts = [
        "Name a color.",
        "Say hello.",
        "What is the sun?",
        "Count to three.",
    ];
    let mut handles = Vec::new();
    for p in prompts {
        let url = gw.url("/v1/chat/completions");
        handles.push(tokio::spawn(async move {
            let body = json!({"model": "smol", "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 16});
            let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }));
    }
    let mut concurrent = Vec::new();
    for h in handles {
        let (s, v) = h.await.unwrap();
        assert_eq!(s, 200, "{v}");
        concurrent.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Batched answers equal the answers each prompt gets alone.
    for (p, batched) in prompts.iter().zip(&concurrent) {
        let (_, v) = ask(&gw, json!({"model": "smol", "messages": [{"role": "user", "content": p}], "temperature": 0, "max_tokens": 16})).await;
        assert_eq!(
            v["choices"][0]["message"]["content"].as_str().unwrap(),
            batched,
            "{p}"
        );
    }

    // Tool calling: tools go into the prompt and the answer is a well-formed completion (whether
    // the base model calls the tool is what fine-tuning improves).
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let (s, v) = ask(&gw, json!({"model": "smol", "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools, "temperature": 0, "max_tokens": 24})).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() > 100,
        "the tool prompt was rendered: {v}"
    );
    let finish = v["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(["stop", "length", "tool_calls"].contains(&finish));
    if finish == "tool_calls" {
        assert!(v["choices"][0]["message"]["tool_calls"][0]["function"]["name"].is_string());
    }

    // Seeded sampling reproduces.
    let seeded = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story."}], "temperature": 1.0, "seed": 42, "max_tokens": 12});
    let (_, a) = ask(&gw, seeded.clone()).await;
    let (_, b) = ask(&gw, seeded).await;
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );

    // Stop sequences end generation without including the stop text.
    let (_, v) = ask(&gw, json!({"model": "smol", "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0, "max_tokens": 30, "stop": ["4"]})).await;
    let stopped = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        !stopped.contains('4') && text.starts_with(stopped),
        "{stopped:?} vs {text:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    assert!(gw.stop().success());
    let n: i64 = gw
        .db()
        .query_row(
            "SELECT COUNT(*) FROM traffic WHERE target_kind = 'local' AND status = 200",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 3 + 4 + 4 + 1 + 2 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_bad_input_gets_clear_errors_and_the_engine_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    flywheel::engine::testing::write_tiny_llama(&path, candle_core::quantized::GgmlDType::Q8_0, 5);
    let mut gw = GatewayProcess::start(
        &local_config(&path, "").replace("context_length = 512", "context_length = 64"),
    );
    let long = "word ".repeat(200);
    let (s, v) = ask(
        &gw,
        json!({"model": "smol", "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 64"),
        "{v}"
    );
    let (s, v) = ask(&gw, json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000})).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "max_tokens");
    // More choices than the engine decodes at once (max_batch, 16 by default).
    let (s, v) = ask(
        &gw,
        json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "n": 17}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "n");
    // Structured answers the grammar cannot hold to, named by the schema path.
    for (schema, param) in [
        (
            json!({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": true}}}),
            "response_format.json_schema.schema.properties.a.uniqueItems",
        ),
        (
            json!({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}),
            "response_format.json_schema.schema.$ref",
        ),
        (
            json!({"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]}),
            "response_format.json_schema.schema",
        ),
    ] {
        let (s, v) = ask(&gw, json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})).await;
        assert_eq!(s, 400, "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    let (s, v) = ask(&gw, json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2})).await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["param"], "top_logprobs");
    // A structured answer that max_tokens cuts finishes with `length`, and is logged as such.
    let (s, v) = ask(
        &gw,
        json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "response_format": {"type": "json_object"}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // Tools are rendered into the prompt (Hermes style): the same request grows by the tool prompt.
    let (s, plain) = ask(
        &gw,
        json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(s, 200);
    let tools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let (s, v) = ask(&gw, json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tools": tools})).await;
    assert_eq!(s, 400, "the tool prompt does not fit in 64 tokens: {v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("at most 64"));
    assert!(plain["usage"]["prompt_tokens"].as_u64().unwrap() < 64);
    // Still serving: random weights give random text, but a whole, well-formed completion.
    let (s, v) = ask(&gw, json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 5);
    // A streaming client that leaves mid-generation frees its slot; others are unaffected.
    let mut r = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    let _ = r.chunk().await;
    drop(r);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (s, _) = ask(
        &gw,
        json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
    )
    .await;
    assert_eq!(s, 200);
    assert!(gw.stop().success());
}

#[test]
fn a_missing_model_file_fails_start_up_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    // Its own data directory: the start-up must not touch the working directory's.
    let text = format!(
        "data_dir = \"{}\"\n{}",
        path_str(&dir.path().join("data")),
        local_config(&dir.path().join("nope.gguf"), "")
    );
    std::fs::write(&config, text).unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fetch-model.sh"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_config_serves_the_local_model_out_of_the_box() {
    tokio::task::spawn_blocking(default_model).await.unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(bin())
        .current_dir(root)
        .args([
            "serve",
            "--config",
            "config/flywheel.toml",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data.path())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(i) = line.find("listening on http://") {
                let a = line[i + 20..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send(a);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the default config did not start");
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(&json!({"model": "smollm2", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "smollm2");
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hugging_face_directory_serves_the_same_answers_as_its_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    flywheel::engine::testing::write_tiny_llama(&gguf, candle_core::quantized::GgmlDType::F32, 41);
    let hf = dir.path().join("hf");
    flywheel::engine::testing::write_hf_dir_from_gguf(&gguf, &hf);
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, "temperature": 0});
    let mut answers = Vec::new();
    for path in [&gguf, &hf] {
        let mut gw = GatewayProcess::start(
            &local_config(path, "weights = \"f32\"")
                .replace("context_length = 512", "context_length = 128"),
        );
        let (s, v) = ask(&gw, body.clone()).await;
        assert_eq!(s, 200, "{v}");
        answers.push((
            v["choices"][0]["message"]["content"].clone(),
            v["usage"].clone(),
        ));
        assert!(gw.stop().success());
    }
    assert_eq!(answers[0], answers[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_renders_tools_is_used_instead_of_the_hermes_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    flywheel::engine::testing::write_tiny_llama(&gguf, candle_core::quantized::GgmlDType::F32, 43);
    let hf = dir.path().join("hf");
    flywheel::engine::testing::write_hf_dir_from_gguf(&gguf, &hf);
    let template = "{% if tools %}T{% for t in tools %}{{ t.function.name }}{% endfor %}\n{% endif %}{% for m in messages %}{{ m.content }}\n{% endfor %}";
    let tc = json!({"chat_template": template, "eos_token": "<|im_end|>"});
    std::fs::write(hf.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let tools = json!([{"type": "function", "function": {"name": "lookup", "description": "a long description that the Hermes prompt would include", "parameters": {"type": "object"}}}]);
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tools": tools});
    let mut gw = GatewayProcess::start(
        &local_config(&hf, "").replace("context_length = 512", "context_length = 256"),
    );
    let (s, v) = ask(&gw, body).await;
    assert_eq!(s, 200, "{v}");
    // "Tlookup\nhi\n": a dozen byte-level tokens, not the hundreds of the Hermes system prompt.
    let n = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!((8..=16).contains(&n), "{n} prompt tokens: {v}");
    assert!(gw.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_engine_serves_as_a_safety_model() {
    let path = tokio::task::spawn_blocking(default_model).await.unwrap();
    let rails = r#"
[[rails.configs]]
name = "local-guard"
[rails.configs.data]
models = [{ type = "guard", engine = "local", model = "smollm2" }]
rails.input.flows = ["llama guard check input $model=guard"]
prompts = [{ task = "llama_guard_check_input", messages = [{ type = "system", content = "You classify messages. Reply with one word: safe or unsafe." }, { type = "user", content = "Message: {{ user_input }}" }], output_parser = "is_content_safe", max_tokens = 4 }]
"#;
    let mut gw = GatewayProcess::start(&local_config(&path, rails));
    let client = reqwest::Client::new();
    let check = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}], "guardrails": {"config_id": "local-guard"}});
    let v: Value = client
        .post(gw.url("/v1/guardrail/checks"))
        .json(&check)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rail = &v["rails_status"]["llama guard check input $model=guard"];
    // The embedded model answered (whatever it judged): a verdict or an unparseable answer, never
    // a failure to reach the model.
    assert_ne!(v["status"], "error", "{v}");
    assert!(
        matches!(rail["status"].as_str(), Some("success" | "blocked")),
        "{v}"
    );
    assert!(rail["latency_ms"].as_f64().unwrap() > 0.0, "{v}");
    let (status, answer) = ask(
        &gw,
        json!({"model": "smol", "messages": [{"role": "user", "content": "What is the capital of France?"}], "guardrails": {"config_id": "local-guard"}, "max_tokens": 8}),
    )
    .await;
    let expected = if v["status"] == "success" { 200 } else { 400 };
    assert_eq!(status, expected, "{answer}");
    eprintln!("local safety verdict: {v}");
    assert!(gw.stop().success());
}

/// Output rails on the engine's own stream: a rail that passes leaves the streamed answer exactly
/// as the engine wrote it; a deny pattern on a word the engine will write stops the stream before
/// that word reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_rails_hold_and_release_the_engines_own_stream() {
    let path = tokio::task::spawn_blocking(default_model).await.unwrap();
    let gw = GatewayProcess::start(&local_config(&path, ""));
    let client = reqwest::Client::new();
    let ask = |config_id: Option<&str>| {
        let mut body = json!({"model": "smol", "temperature": 0, "max_tokens": 32, "stream": true,
            "messages": [{"role": "user", "content": "Describe the city of Paris in two sentences."}]});
        if let Some(id) = config_id {
            body["guardrails"] = json!({"config_id": id});
        }
        body
    };
    let stream = |body: Value| {
        let client = client.clone();
        let url = gw.url("/v1/chat/completions");
        async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let (plain, finishes, _) = stream_parts(&stream(ask(None)).await);
    assert_eq!(finishes.len(), 1, "{plain}");
    // A word first written past the first third of the answer, which the deny pattern will name.
    let words: Vec<&str> = plain
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| w.len() >= 4)
        .collect();
    assert!(
        words.len() >= 2,
        "the engine's answer is too short to test with: {plain:?}"
    );
    let word = words
        .iter()
        .find(|w| plain.find(*w).is_some_and(|at| at > plain.len() / 3))
        .copied()
        .unwrap_or(words[words.len() - 1]);
    let create = |name: &str, pattern: &str| {
        json!({"name": name, "data": {"rails": {
            "output": {"flows": ["regex check output"], "streaming": {"enabled": true, "chunk_size": 2, "context_size": 4}},
            "config": {"regex_detection": {"output": {"patterns": [pattern]}}}}}})
    };
    for (name, pattern) in [
        ("passes", "zqxj{3}".to_string()),
        ("denies", regex::escape(word)),
    ] {
        let r = client
            .post(gw.url("/v1/guardrail/configs"))
            .json(&create(name, &pattern))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let (passed, finishes_passed, _) = stream_parts(&stream(ask(Some("passes"))).await);
    assert_eq!(
        passed, plain,
        "a rail that passes changed the engine's stream"
    );
    assert_eq!(finishes_passed, finishes);
    let body = stream(ask(Some("denies"))).await;
    let (denied, finishes_denied, _) = stream_parts(&body);
    let refusal = "The answer was withheld by the content-safety policy.";
    let released = denied
        .strip_suffix(refusal)
        .unwrap_or_else(|| panic!("{body}"));
    assert!(
        !released.contains(word),
        "'{word}' reached the client: {released:?}"
    );
    assert!(
        plain.starts_with(released),
        "{released:?} is not the start of {plain:?}"
    );
    assert_eq!(finishes_denied, ["content_filter"]);
    eprintln!("engine answer: {plain:?}; denied '{word}', released {released:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prompt_prefix_is_reused_and_changes_no_answer() {
    let path = tokio::task::spawn_blocking(default_model).await.unwrap();
    let system = "You are the assistant of a weather service. Answer in one short sentence, \
                  politely, without greetings, and never mention that you are a language model.";
    let ask_about = |question: &str| {
        json!({"model": "smol", "temperature": 0, "max_tokens": 24, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": question}
        ]})
    };
    let cached_tokens = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };

    let mut gw = GatewayProcess::start(&local_config(&path, ""));
    let (status, first) = ask(&gw, ask_about("Will it rain in Paris tomorrow?")).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(cached_tokens(&first), 0);
    let (_, second) = ask(&gw, ask_about("Is it windy in Oslo?")).await;
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let reused = cached_tokens(&second);
    // The system prompt (and the template around it) came from the cache; the new question did not.
    assert!(reused >= 30 && reused < prompt, "{reused} of {prompt}");
    assert!(gw.stop().success());

    // The same question without prefix caching: the very same answer.
    let mut plain = GatewayProcess::start(&local_config(&path, "prefix_cache_mb = 0"));
    let (_, fresh) = ask(&plain, ask_about("Is it windy in Oslo?")).await;
    assert_eq!(cached_tokens(&fresh), 0);
    assert_eq!(
        fresh["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
    assert!(plain.stop().success());
}

/// The function calls of a completion: (name, arguments parsed as JSON).
fn calls_of(v: &Value) -> Vec<(String, Value)> {
    v["choices"][0]["message"]["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|c| {
                    let args = c["function"]["arguments"].as_str().unwrap();
                    let parsed = serde_json::from_str(args)
                        .unwrap_or_else(|e| panic!("arguments are not JSON ({e}): {args}"));
                    (c["function"]["name"].as_str().unwrap().to_string(), parsed)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_model_writes_schema_valid_calls_when_calls_are_constrained() {
    // Weights with no idea of JSON: every well-formed call below is the grammar's doing, bounds
    // included. The schema's only string is bounded, so each call ends within a bounded number of
    // tokens.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    // A template that names the tools itself keeps the prompt short for the byte-level vocabulary.
    flywheel::engine::testing::write_tiny_llama_with_template(
        &path,
        candle_core::quantized::GgmlDType::F32,
        9,
        flywheel::engine::testing::TINY_TOOLS_TEMPLATE,
    );
    let gw = GatewayProcess::start(&local_config(&path, ""));
    let tools = json!([
        {"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object",
            "properties": {"hour": {"type": "integer", "minimum": 1, "maximum": 12}, "am": {"type": "boolean"},
                           "days": {"type": "array", "items": {"enum": ["mon", "tue", "wed"]}, "maxItems": 2},
                           "label": {"type": "string", "minLength": 1, "maxLength": 3, "pattern": "^[a-z]+$"}},
            "required": ["hour", "am"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "snooze", "parameters": {"type": "object",
            "properties": {"minutes": {"enum": [5, 10]}}, "required": ["minutes"]}}}
    ]);
    let mut names = std::collections::HashSet::new();
    for seed in 0..6 {
        let choice = if seed == 5 {
            json!({"type": "function", "function": {"name": "snooze"}})
        } else {
            json!("required")
        };
        let body = json!({"model": "smol", "messages": [{"role": "user", "content": "wake me"}],
            "tools": tools, "tool_choice": choice, "parallel_tool_calls": false, "temperature": 1.0,
            "seed": seed, "max_tokens": 450});
        let (s, v) = ask(&gw, body).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        let calls = calls_of(&v);
        assert_eq!(calls.len(), 1, "one call, as asked: {v}");
        for (name, args) in calls {
            let o = args.as_object().unwrap();
            match name.as_str() {
                "set_alarm" => {
                    assert!(
                        o["hour"].as_i64().is_some_and(|h| (1..=12).contains(&h)),
                        "{args}"
                    );
                    assert!(o["am"].is_boolean(), "{args}");
                    assert!(o
                        .keys()
                        .all(|k| ["hour", "am", "days", "label"].contains(&k.as_str())));
                    if let Some(l) = o.get("label") {
                        let l = l.as_str().unwrap_or_default();
                        assert!(
                            (1..=3).contains(&l.chars().count())
                                && l.chars().all(|c| c.is_ascii_lowercase()),
                            "{args}"
                        );
                    }
                    if let Some(d) = o.get("days") {
                        let d = d.as_array().unwrap();
                        assert!(
                            d.len() <= 2
                                && d.iter()
                                    .all(|x| ["mon", "tue", "wed"].contains(&x.as_str().unwrap())),
                            "{args}"
                        );
                    }
                }
                "snooze" => assert!(o["minutes"] == 5 || o["minutes"] == 10, "{args}"),
                other => panic!("unknown function {other}"),
            }
            if seed == 5 {
                assert_eq!(name, "snooze", "the named choice is honoured");
            }
            names.insert(name);
        }
    }
    assert!(names.contains("snooze"));
    // Cut off by max_tokens mid-call: the finish reason says so, and the half-written call is
    // still reported (its arguments are not JSON), never dropped.
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "wake me"}],
        "tools": tools, "tool_choice": "required", "temperature": 0, "max_tokens": 50});
    let (s, v) = ask(&gw, body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    let call = &v["choices"][0]["message"]["tool_calls"][0]["function"];
    assert!(call["name"].is_string(), "{v}");
    let args = call["arguments"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(args).is_err(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_tool_calls_follow_the_schema_streamed_or_not() {
    let path = tokio::task::spawn_blocking(default_model).await.unwrap();
    let gw = GatewayProcess::start(&local_config(&path, ""));
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}]);
    let check = |args: &Value| {
        let o = args.as_object().unwrap();
        assert!(o["city"].is_string(), "{args}");
        assert!(
            o["unit"] == "celsius" || o["unit"] == "fahrenheit",
            "{args}"
        );
        assert!(o.len() == 2, "{args}");
    };
    for (temperature, seed) in [(0.0, 0), (1.0, 1), (1.0, 2)] {
        let body = json!({"model": "smol", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": tools, "tool_choice": "required", "parallel_tool_calls": false,
            "temperature": temperature, "seed": seed, "max_tokens": 120});
        let (s, v) = ask(&gw, body).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        let calls = calls_of(&v);
        assert_eq!(calls.len(), 1, "{v}");
        assert_eq!(calls[0].0, "get_weather");
        check(&calls[0].1);
    }
    // Streamed: the argument fragments join into the same kind of valid call.
    let body = json!({"model": "smol", "messages": [{"role": "user", "content": "Weather in Oslo, please."}],
        "tools": tools, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0, "max_tokens": 120, "stream": true});
    let text = reqwest::Client::new()
        .post(gw.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut args = String::new();
    let mut finish = None;
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(line).unwrap();
        if let Some(c) = chunk["choices"].get(0) {
            if let Some(a) = c["delta"]["tool_calls"][0]["function"]["arguments"].as_str() {
                args.push_str(a);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"), "{text}");
    check(&serde_json::from_str(&args).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_structured_outputs_logprobs_and_n_through_the_python_clients() {
    let path = tokio::task::spawn_blocking(default_model).await.unwrap();
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let mut gw = GatewayProcess::start(
        &local_config(&path, "").replace("context_length = 512", "context_length = 2048"),
    );
    let stdout = run_script(python, "local_features.py", &[gw.url("/v1"), "smol".into()]).await;
    println!("{stdout}");
    let passed = stdout.lines().filter(|l| l.starts_with("ok: ")).count();
    assert!(passed >= 28, "{stdout}");
    assert!(gw.stop().success());
}

/// The top-5 logprobs of each greedy step, from the engine on `weights`.
fn engine_logprobs(
    path: &Path,
    weights: &str,
    prompt: &[u32],
    steps: usize,
) -> Vec<flywheel::engine::sampling::TokenLogprob> {
    use flywheel::engine::{Engine, GenEvent, GenerationRequest, LocalModelConfig};
    let cfg: LocalModelConfig = toml::from_str(&format!(
        "name = \"smollm2\"\npath = \"{}\"\nweights = \"{weights}\"\ncontext_length = 512\nprefix_cache_mb = 0\n",
        path_str(path)
    ))
    .unwrap();
    let engine = Engine::load(&cfg).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .submit(GenerationRequest {
            prompt: prompt.to_vec(),
            max_tokens: steps,
            stop: Vec::new(),
            sampling: flywheel::engine::sampling::SamplingParams {
                temperature: 0.0,
                ..Default::default()
            },
            events: tx,
            adapter: None,
            grammar: None,
            logprobs: Some(5),
            n: 1,
        })
        .unwrap();
    let mut out = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenEvent::Delta { logprobs, .. } => out.extend(logprobs),
            GenEvent::Done { .. } => break,
            GenEvent::Error(e) => panic!("{e}"),
        }
    }
    out
}

/// The engine's logprobs against llama.cpp's, recorded by `benches/oracle.sh` from an F32 copy of
/// the same GGUF with an f32 KV cache: on `weights = "f32"` both hold the same weights and compute
/// in f32, so the greedy tokens agree and each of llama.cpp's top-5 logprobs is matched within
/// 0.02 nats. Measured, the worst gap is 0.005 (the engine keeps its KV cache in f16, and the two
/// differ in summation order and rope angle tables over 30 layers); a real deviation is far
/// larger: an output head left
/// quantized (activations rounded to 8 bits) moved them by up to 0.12. The q8_0 and native paths'
/// drift from the f32 path is printed (BENCHMARKS.md records it).
#[test]
fn the_f32_engine_matches_llama_cpp_logprobs_token_by_token() {
    let path = default_model();
    let oracle: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/llamacpp_logprobs.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let prompt: Vec<u32> = oracle["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    // The engine's tokenizer reads the prompt as llama.cpp's did.
    let chat = flywheel::engine::chat::ChatFormat::load(&path).unwrap();
    assert_eq!(
        chat.encode(oracle["prompt"].as_str().unwrap()).unwrap(),
        prompt
    );
    let steps = oracle["steps"].as_array().unwrap();
    let ours = engine_logprobs(&path, "f32", &prompt, steps.len());
    assert_eq!(ours.len(), steps.len(), "the engine stopped early");
    const TOLERANCE: f32 = 0.02;
    let mut worst = 0f32;
    for (i, (mine, theirs)) in ours.iter().zip(steps).enumerate() {
        assert_eq!(
            mine.token as u64,
            theirs["token"].as_u64().unwrap(),
            "step {i}: another greedy token"
        );
        for pair in theirs["top"].as_array().unwrap() {
            let (id, lp) = (
                pair[0].as_u64().unwrap() as u32,
                pair[1].as_f64().unwrap() as f32,
            );
            let found = mine.top.iter().find(|t| t.0 == id);
            match found {
                Some(&(_, m)) => {
                    worst = worst.max((m - lp).abs());
                    assert!(
                        (m - lp).abs() <= TOLERANCE,
                        "step {i}, token {id}: {m} vs llama.cpp {lp}"
                    );
                }
                // A near tie at the edge of the top 5 may fall just outside ours.
                None => {
                    let fifth = mine.top.last().unwrap().1;
                    assert!(
                        lp <= fifth + TOLERANCE,
                        "step {i}: llama.cpp's {id} ({lp}) missing from {:?}",
                        mine.top
                    );
                }
            }
        }
    }
    println!(
        "f32 vs llama.cpp: worst top-5 logprob difference {worst:.5} over {} steps",
        steps.len()
    );
    // The quantized paths' drift from f32 (mean absolute difference over the same top-5 entries).
    for weights in ["q8_0", "native"] {
        let other = engine_logprobs(&path, weights, &prompt, steps.len());
        let mut diffs = Vec::new();
        for (a, b) in ours.iter().zip(&other) {
            for &(id, lp) in &a.top {
                if let Some(&(_, q)) = b.top.iter().find(|t| t.0 == id) {
                    diffs.push((lp - q).abs());
                }
            }
        }
        let same = ours
            .iter()
            .zip(&other)
            .take_while(|(a, b)| a.token == b.token)
            .count();
        let mean = diffs.iter().sum::<f32>() / diffs.len().max(1) as f32;
        println!("{weights} vs f32: mean |logprob difference| {mean:.4} over {} top-5 entries; greedy tokens agree for {same} of {} steps", diffs.len(), steps.len());
        assert!(mean < 0.5, "{weights} drifts {mean} nats from f32");
    }
}
