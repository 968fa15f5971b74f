//! Tool calling on the default model with and without constrained decoding: how often SmolLM2
//! answers with a call at all, with arguments that parse as JSON, that are valid against the tool's
//! schema (JSON Schema's own rules: undeclared properties allowed unless the schema says not),
//! and that name the function the prompt asks for. Greedy decoding, `tool_choice` auto and
//! required, the same prompts through two gateways that differ only in `constrain_tool_calls`.
//!
//! `cargo bench --bench tool_calls`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::GatewayProcess;
use serde_json::{json, Value};

/// (user message, the function it calls for).
const PROMPTS: &[(&str, &str)] = &[
    ("What's the weather like in Paris today?", "get_weather"),
    (
        "Is it raining in Tokyo right now? Use fahrenheit.",
        "get_weather",
    ),
    ("How cold is it in Oslo?", "get_weather"),
    (
        "Tell me the temperature in Cairo in celsius.",
        "get_weather",
    ),
    ("What time is it in New York?", "get_time"),
    (
        "Give me the current time for the Europe/Berlin timezone.",
        "get_time",
    ),
    ("What's the local time in Sydney?", "get_time"),
    ("Convert 100 US dollars to euros.", "convert_currency"),
    ("How many yen is 50 pounds?", "convert_currency"),
    ("Change 20 EUR into CHF please.", "convert_currency"),
    (
        "Search the web for the tallest building in the world.",
        "search_web",
    ),
    ("Look up recent news about electric cars.", "search_web"),
    ("Find recipes for vegan lasagna online.", "search_web"),
    ("Set a reminder to call mom at 6pm.", "create_reminder"),
    ("Remind me tomorrow morning to buy milk.", "create_reminder"),
    (
        "Create a reminder for the dentist appointment on Friday at 9.",
        "create_reminder",
    ),
];

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "Current local time in a timezone",
            "parameters": {"type": "object", "properties": {
                "timezone": {"type": "string", "description": "IANA timezone or city"}},
                "required": ["timezone"]}}},
        {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount between currencies",
            "parameters": {"type": "object", "properties": {
                "amount": {"type": "number"},
                "from": {"type": "string", "description": "ISO code"},
                "to": {"type": "string", "description": "ISO code"}},
                "required": ["amount", "from", "to"]}}},
        {"type": "function", "function": {"name": "search_web", "description": "Search the web",
            "parameters": {"type": "object", "properties": {
                "query": {"type": "string"},
                "max_results": {"type": "integer"}},
                "required": ["query"]}}},
        {"type": "function", "function": {"name": "create_reminder", "description": "Create a reminder",
            "parameters": {"type": "object", "properties": {
                "text": {"type": "string"},
                "when": {"type": "string", "description": "Date and time"}},
                "required": ["text", "when"]}}}
    ])
}

/// JSON Schema validation for the keywords the tools above use.
fn valid(v: &Value, s: &Value) -> bool {
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return false;
        }
    }
    let typed = match s.get("type").and_then(Value::as_str) {
        Some("object") => v.is_object(),
        Some("string") => v.is_string(),
        Some("number") => v.is_number(),
        Some("integer") => v.is_i64() || v.is_u64(),
        Some("boolean") => v.is_boolean(),
        Some("array") => v.is_array(),
        _ => true,
    };
    if !typed {
        return false;
    }
    if let (Some(o), Some(props)) = (
        v.as_object(),
        s.get("properties").and_then(Value::as_object),
    ) {
        let required = s.get("required").and_then(Value::as_array);
        if required
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|r| !o.contains_key(r))
        {
            return false;
        }
        return o
            .iter()
            .all(|(k, x)| props.get(k).is_none_or(|p| valid(x, p)));
    }
    true
}

#[derive(Default)]
struct Tally {
    calls: usize,
    json: usize,
    schema: usize,
    right_name: usize,
    ms: Vec<f64>,
}

async fn run(gw: &GatewayProcess, choice: &str) -> Tally {
    let tools = tools();
    let mut t = Tally::default();
    let client = reqwest::Client::new();
    for (prompt, want) in PROMPTS {
        let body = json!({"model": "smol", "messages": [{"role": "user", "content": prompt}],
            "tools": tools, "tool_choice": choice, "temperature": 0, "max_tokens": 96});
        let start = Instant::now();
        let v: Value = client
            .post(gw.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        t.ms.push(start.elapsed().as_secs_f64() * 1000.0);
        let Some(calls) = v["choices"][0]["message"]["tool_calls"].as_array() else {
            continue;
        };
        let Some(first) = calls.first() else {
            continue;
        };
        t.calls += 1;
        let name = first["function"]["name"].as_str().unwrap_or("");
        let args: Option<Value> = first["function"]["arguments"]
            .as_str()
            .and_then(|a| serde_json::from_str(a).ok());
        if name == *want {
            t.right_name += 1;
        }
        let Some(args) = args else {
            continue;
        };
        t.json += 1;
        let schema = tools
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["function"]["name"] == name)
            .map(|f| f["function"]["parameters"].clone());
        if schema.is_some_and(|s| valid(&args, &s)) {
            t.schema += 1;
        }
    }
    t
}

fn main() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "run `bash scripts/fetch-model.sh` first");
    let rt = tokio::runtime::Runtime::new().unwrap();
    println!(
        "tool calling, SmolLM2-135M-Instruct Q4_1, {} prompts, greedy, max_tokens 96",
        PROMPTS.len()
    );
    println!("| constrained | tool_choice | answered with a call | arguments are JSON | valid against the schema | right function | median ms/request |");
    println!("|---|---|---|---|---|---|---|");
    for constrained in [false, true] {
        let config = format!(
            "[[models]]\nname = \"smollm2\"\npath = \"{}\"\ncontext_length = 2048\nconstrain_tool_calls = {constrained}\n[[routes]]\nname = \"smol\"\nchampion = {{ local = \"smollm2\" }}\n",
            path.display()
        );
        let mut gw = GatewayProcess::start(&config);
        for choice in ["auto", "required"] {
            let mut t = rt.block_on(run(&gw, choice));
            t.ms.sort_by(f64::total_cmp);
            let n = PROMPTS.len();
            let pct = |k: usize| format!("{k}/{n}");
            println!(
                "| {} | {choice} | {} | {} | {} | {} | {:.0} |",
                if constrained { "yes" } else { "no" },
                pct(t.calls),
                pct(t.json),
                pct(t.schema),
                pct(t.right_name),
                t.ms[n / 2]
            );
        }
        gw.stop();
    }
}
