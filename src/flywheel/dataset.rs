//! Tool-calling datasets: OpenAI-format records (`messages` ending with the assistant's answer, plus
//! `tools`), imported from plain OpenAI JSONL or from the xLAM function-calling format, split into
//! seeded train/validation/test sets stratified by tool name, and turned into training examples
//! and evaluation items.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::eval::EvalItem;
use super::train::model::SplitMix;
use super::train::TrainExample;
use crate::engine::chat::ChatFormat;

/// One conversation whose last message is the answer to learn or to score against.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub messages: Vec<Value>,
    pub tools: Vec<Value>,
    pub tool_choice: Option<Value>,
    /// BFCL's acceptable values per call (`[{name: {param: [values]}}]`), for AST scoring.
    pub ground_truth: Option<Value>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("row {row}: {message}")]
pub struct DataError {
    /// 1-based line number.
    pub row: usize,
    pub message: String,
}

impl Record {
    /// The answer (the last message).
    pub fn answer(&self) -> Option<&Value> {
        self.messages.last()
    }

    /// The expected calls of the answer, arguments parsed.
    pub fn expected_calls(&self) -> Vec<(String, Value)> {
        self.answer()
            .map(crate::wire::tool_calls::in_message)
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let args = c.parsed_arguments().unwrap_or(Value::Null);
                (c.name, args)
            })
            .collect()
    }

    /// The name the split is stratified by: the first expected call, or "" for a plain answer.
    pub fn stratum(&self) -> String {
        self.expected_calls()
            .first()
            .map(|(n, _)| n.clone())
            .unwrap_or_default()
    }

    /// The first user message's text: what duplicates are detected on.
    pub fn user_query(&self) -> String {
        self.messages
            .iter()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
            .and_then(|m| m.get("content"))
            .map(|c| match c {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_default()
    }

    /// The record as one OpenAI-format JSONL object.
    pub fn to_json(&self) -> Value {
        let mut o = json!({"messages": self.messages, "tools": self.tools});
        if let Some(c) = &self.tool_choice {
            o["tool_choice"] = c.clone();
        }
        if let Some(g) = &self.ground_truth {
            o["bfcl_ground_truth"] = g.clone();
        }
        o
    }

    pub fn eval_item(&self) -> EvalItem {
        EvalItem {
            messages: self.messages[..self.messages.len().saturating_sub(1)].to_vec(),
            tools: self.tools.clone(),
            tool_choice: self.tool_choice.clone(),
            expected: self.expected_calls(),
            ground_truth: self.ground_truth.clone(),
        }
    }
}

/// Validates one OpenAI-format record and normalises its tool-call arguments to JSON strings.
fn check_record(v: Value) -> Result<Record, String> {
    let Value::Object(mut o) = v else {
        return Err("not a JSON object".into());
    };
    let mut messages = match o.remove("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err("'messages' is empty".into()),
        _ => return Err("'messages' must be an array".into()),
    };
    let tools = match o.remove("tools") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(t)) => t,
        Some(_) => return Err("'tools' must be an array".into()),
    };
    for (i, t) in tools.iter().enumerate() {
        let f = t.get("function").unwrap_or(t);
        match f.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => {}
            _ => return Err(format!("tools[{i}] has no function name")),
        }
    }
    for (i, m) in messages.iter_mut().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or_default();
        if !matches!(role, "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(format!("messages[{i}] has an unknown role '{role}'"));
        }
        let Some(calls) = m.get_mut("tool_calls").and_then(Value::as_array_mut) else {
            continue;
        };
        for (j, c) in calls.iter_mut().enumerate() {
            match c.pointer("/function/name").and_then(Value::as_str) {
                Some(n) if !n.is_empty() => {}
                _ => {
                    return Err(format!(
                        "messages[{i}].tool_calls[{j}] has no function name"
                    ))
                }
            }
            let args = c.pointer("/function/arguments").cloned();
            let text = match args {
                Some(Value::String(s)) => {
                    serde_json::from_str::<Value>(&s).map_err(|e| {
                        format!("messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}")
                    })?;
                    s
                }
                Some(Value::Object(a)) => Value::Object(a).to_string(),
                None => "{}".into(),
                Some(_) => {
                    return Err(format!(
                        "messages[{i}].tool_calls[{j}].function.arguments must be a JSON object or string"
                    ))
                }
            };
            c["function"]["arguments"] = Value::String(text);
            if c.get("type").is_none() {
                c["type"] = json!("function");
            }
        }
    }
    if messages
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        != Some("assistant")
    {
        return Err("the last message must be the assistant's answer".into());
    }
    Ok(Record {
        messages,
        tools,
        tool_choice: o.remove("tool_choice"),
        ground_truth: o.remove("bfcl_ground_truth"),
    })
}

/// Parses OpenAI-format JSONL (`{"messages": [...], "tools": [...]}` per line).
pub fn parse_openai_jsonl(text: &str) -> Result<Vec<Record>, DataError> {
    parse_lines(text, check_record)
}

/// Parses JSONL with `f` per non-blank line; an error names its 1-based line.
fn parse_lines<T>(text: &str, f: impl Fn(Value) -> Result<T, String>) -> Result<Vec<T>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError {
            row: i + 1,
            message,
        };
        let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
        out.push(f(v).map_err(err)?);
    }
    Ok(out)
}

/// Parses evaluation items: either records whose last message is the expected answer, or the
/// NeMo tutorial's test rows (`messages`, `tools` and the expected `tool_calls` beside them).
pub fn parse_eval_items(text: &str) -> Result<Vec<EvalItem>, DataError> {
    parse_lines(text, eval_item_of)
}

fn eval_item_of(v: Value) -> Result<EvalItem, String> {
    let Some(calls) = v.get("tool_calls") else {
        return Ok(check_record(v)?.eval_item());
    };
    let messages = match v.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m.clone(),
        _ => return Err("'messages' must be a non-empty array".into()),
    };
    let mut expected = Vec::new();
    for (j, c) in calls.as_array().into_iter().flatten().enumerate() {
        let f = c.get("function").unwrap_or(c);
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| format!("tool_calls[{j}] has no function name"))?;
        let args = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str(s)
                .map_err(|e| format!("tool_calls[{j}].function.arguments is not JSON: {e}"))?,
            Some(a) => a.clone(),
            None => json!({}),
        };
        expected.push((name.to_string(), args));
    }
    Ok(EvalItem {
        messages,
        tools: v
            .get("tools")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default(),
        tool_choice: v.get("tool_choice").cloned(),
        expected,
        ground_truth: v.get("bfcl_ground_truth").cloned(),
    })
}

/// A Python type name from xLAM's tool descriptions as a JSON Schema type.
fn schema_type(python: &str) -> &'static str {
    let t = python.trim();
    let base = t
        .split(['[', ','])
        .next()
        .unwrap_or(t)
        .trim()
        .to_ascii_lowercase();
    match base.as_str() {
        "str" | "string" => "string",
        "int" | "integer" => "integer",
        "float" | "number" => "number",
        "bool" | "boolean" => "boolean",
        "list" | "tuple" | "set" => "array",
        "dict" | "object" => "object",
        _ => "string",
    }
}

/// Converts one xLAM row (`query`, and `tools` and `answers` as JSON-encoded strings) into an
/// OpenAI-format record, as NVIDIA's data flywheel tutorial does.
pub fn from_xlam(v: &Value) -> Result<Record, String> {
    let query = v
        .get("query")
        .and_then(Value::as_str)
        .ok_or("'query' must be a string")?;
    let decode = |k: &str| -> Result<Vec<Value>, String> {
        match v.get(k) {
            Some(Value::String(s)) => match serde_json::from_str(s) {
                Ok(Value::Array(a)) => Ok(a),
                Ok(_) => Err(format!("'{k}' must encode a JSON array")),
                Err(e) => Err(format!("'{k}' is not valid JSON: {e}")),
            },
            Some(Value::Array(a)) => Ok(a.clone()),
            _ => Err(format!("'{k}' is missing")),
        }
    };
    let mut tools = Vec::new();
    for (i, t) in decode("tools")?.iter().enumerate() {
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or(format!("tools[{i}] has no name"))?;
        let mut properties = serde_json::Map::new();
        let mut required = Vec::new();
        if let Some(Value::Object(ps)) = t.get("parameters") {
            for (pname, p) in ps {
                let ty = p.get("type").and_then(Value::as_str).unwrap_or("str");
                let mut prop = json!({"type": schema_type(ty)});
                if let Some(d) = p.get("description") {
                    prop["description"] = d.clone();
                }
                let optional = ty.contains("optional") || p.get("default").is_some();
                if !optional {
                    required.push(json!(pname));
                }
                properties.insert(pname.clone(), prop);
            }
        }
        tools.push(json!({"type": "function", "function": {
            "name": name,
            "description": t.get("description").cloned().unwrap_or(json!("")),
            "parameters": {"type": "object", "properties": properties, "required": required},
        }}));
    }
    let mut calls = Vec::new();
    for (i, a) in decode("answers")?.iter().enumerate() {
        let name = a
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or(format!("answers[{i}] has no name"))?;
        let args = a.get("arguments").cloned().unwrap_or(json!({}));
        calls.push(json!({"id": format!("call_{i}"), "type": "function",
            "function": {"name": name, "arguments": args.to_string()}}));
    }
    check_record(json!({
        "messages": [
            {"role": "user", "content": query},
            {"role": "assistant", "content": "", "tool_calls": calls},
        ],
        "tools": tools,
    }))
}

/// Parses xLAM JSONL (one row per line) or a JSON array of rows.
pub fn parse_xlam(text: &str) -> Result<Vec<Record>, DataError> {
    if text.trim_start().starts_with('[') {
        let rows: Vec<Value> = serde_json::from_str(text).map_err(|e| DataError {
            row: 1,
            message: format!("not a JSON array: {e}"),
        })?;
        return rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                from_xlam(r).map_err(|message| DataError {
                    row: i + 1,
                    message,
                })
            })
            .collect();
    }
    parse_lines(text, |v| from_xlam(&v))
}

/// BFCL's schema dialect (`dict`, `float`, `tuple`, `any`) as JSON Schema, recursively.
fn bfcl_schema(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let mut out = serde_json::Map::new();
            for (k, x) in o {
                let x = if k == "type" {
                    match x.as_str() {
                        Some("dict") => json!("object"),
                        Some("float") => json!("number"),
                        Some("tuple") => json!("array"),
                        Some("any") => json!("string"),
                        _ => x.clone(),
                    }
                } else {
                    bfcl_schema(x)
                };
                out.insert(k.clone(), x);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(bfcl_schema).collect()),
        other => other.clone(),
    }
}

/// Joins BFCL question rows (`id`, `question`: turns of messages, `function`: tool docs) with their
/// `possible_answer` rows (`id`, `ground_truth`: `[{name: {param: [acceptable values]}}]`). The
/// answer to learn takes each parameter's first acceptable value and leaves out parameters whose
/// first acceptable value is "" (optional, not given). A question without a possible answer (the
/// irrelevance categories) expects no call.
pub fn parse_bfcl(questions: &str, answers: Option<&str>) -> Result<Vec<Record>, DataError> {
    let mut truth = std::collections::HashMap::new();
    if let Some(a) = answers {
        for (i, line) in a.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| DataError {
                row: i + 1,
                message: format!("possible answer is not JSON: {e}"),
            })?;
            let id = v
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            truth.insert(id, v.get("ground_truth").cloned().unwrap_or(Value::Null));
        }
    }
    parse_lines(questions, |v| {
        let id = v.get("id").and_then(Value::as_str).unwrap_or_default();
        let turn = v
            .pointer("/question/0")
            .and_then(Value::as_array)
            .ok_or("'question' must hold at least one turn of messages")?;
        let tools: Vec<Value> = v
            .get("function")
            .and_then(Value::as_array)
            .ok_or("'function' must be an array")?
            .iter()
            .map(|f| json!({"type": "function", "function": bfcl_schema(f)}))
            .collect();
        let mut calls = Vec::new();
        let gt = truth.get(id).cloned();
        for (i, c) in gt.iter().filter_map(Value::as_array).flatten().enumerate() {
            let (name, params) = c.as_object().and_then(|o| o.iter().next()).ok_or(format!(
                "ground_truth[{i}] of '{id}' is not {{name: params}}"
            ))?;
            let mut args = serde_json::Map::new();
            for (p, acceptable) in params.as_object().into_iter().flatten() {
                match acceptable.as_array().and_then(|a| a.first()) {
                    Some(Value::String(s)) if s.is_empty() => {}
                    Some(first) => {
                        args.insert(p.clone(), first.clone());
                    }
                    None => {}
                }
            }
            calls.push(json!({"id": format!("call_{i}"), "type": "function",
                "function": {"name": name, "arguments": Value::Object(args).to_string()}}));
        }
        let mut messages = turn.clone();
        messages.push(if calls.is_empty() {
            json!({"role": "assistant", "content": ""})
        } else {
            json!({"role": "assistant", "content": "", "tool_calls": calls})
        });
        let mut r = check_record(json!({"messages": messages, "tools": tools}))?;
        r.ground_truth = gt.filter(|g| !g.is_null());
        Ok(r)
    })
}

/// Drops records whose user query was already seen (the first one stays).
pub fn dedup(records: Vec<Record>) -> Vec<Record> {
    let mut seen = std::collections::HashSet::new();
    records
        .into_iter()
        .filter(|r| seen.insert(r.user_query()))
        .collect()
}

/// Train, validation and test sets.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Vec<Record>,
    pub validation: Vec<Record>,
    pub test: Vec<Record>,
}

impl Splits {
    /// Writes the splits under `root` as a stored dataset's files (`training/`, `validation/`,
    /// `testing/`, each one `data.jsonl`), each file whole or not at all: written aside, then
    /// renamed into place.
    pub fn write(&self, root: &std::path::Path) -> std::io::Result<()> {
        for (split, records) in [
            ("training", &self.train),
            ("validation", &self.validation),
            ("testing", &self.test),
        ] {
            let dir = root.join(split);
            std::fs::create_dir_all(&dir)?;
            let text: String = records
                .iter()
                .map(|r| format!("{}\n", r.to_json()))
                .collect();
            let tmp = dir.join("data.jsonl.partial");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, dir.join("data.jsonl"))?;
        }
        Ok(())
    }
}

/// Deterministic splits, stratified by tool name: records are shuffled with `seed` within each
/// tool and the tools themselves are put in a seeded order; walking that sequence, every k-th
/// record goes to test (and then to validation) by a running count, so each split gets its share
/// of every tool that is common enough to have one, and exactly its share overall, even when most
/// tools appear only once.
pub fn split(records: &[Record], validation: f64, test: f64, seed: u64) -> Splits {
    let mut by: BTreeMap<String, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by.entry(r.stratum()).or_default().push(r);
    }
    let mut rng = SplitMix(seed);
    let shuffle = |v: &mut Vec<&Record>, rng: &mut SplitMix| {
        for i in (1..v.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    };
    let mut groups: Vec<Vec<&Record>> = by.into_values().collect();
    for g in groups.iter_mut() {
        shuffle(g, &mut rng);
    }
    for i in (1..groups.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        groups.swap(i, j);
    }
    let mut out = Splits {
        train: Vec::new(),
        validation: Vec::new(),
        test: Vec::new(),
    };
    let val_share = if test < 1.0 {
        validation / (1.0 - test)
    } else {
        0.0
    };
    let crosses =
        |i: usize, share: f64| ((i + 1) as f64 * share).floor() > (i as f64 * share).floor();
    let mut rest = 0;
    for (i, r) in groups.into_iter().flatten().enumerate() {
        if crosses(i, test) {
            out.test.push(r.clone());
        } else {
            if crosses(rest, val_share) {
                out.validation.push(r.clone());
            } else {
                out.train.push(r.clone());
            }
            rest += 1;
        }
    }
    out
}

/// Renders records into training examples with the model's own chat format.
pub fn training_examples(
    chat: &ChatFormat,
    records: &[Record],
) -> Result<Vec<TrainExample>, DataError> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (answer, context) = r.messages.split_last().ok_or_else(|| DataError {
                row: i + 1,
                message: "no messages".into(),
            })?;
            let ex = chat
                .training_example(context, &r.tools, r.tool_choice.as_ref(), answer)
                .map_err(|message| DataError {
                    row: i + 1,
                    message,
                })?;
            let prompt_len = ex.prompt.len();
            let mut tokens = ex.prompt;
            tokens.extend(ex.completion);
            Ok(TrainExample { tokens, prompt_len })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlam_rows_become_openai_records_with_json_schema_types() {
        let row = json!({
            "query": "Where can I find live giveaways for beta access and games?",
            "tools": "[{\"name\": \"live_giveaways_by_type\", \"description\": \"Retrieve live giveaways\", \"parameters\": {\"type\": {\"description\": \"The type of giveaways\", \"type\": \"str\", \"default\": \"game\"}, \"limit\": {\"description\": \"max\", \"type\": \"int\"}, \"ids\": {\"type\": \"List[int]\"}, \"ratio\": {\"type\": \"float\"}, \"on\": {\"type\": \"bool\"}, \"meta\": {\"type\": \"dict\"}, \"when\": {\"type\": \"datetime\"}}}]",
            "answers": "[{\"name\": \"live_giveaways_by_type\", \"arguments\": {\"type\": \"beta\"}}, {\"name\": \"live_giveaways_by_type\", \"arguments\": {\"type\": \"game\"}}]"
        });
        let r = from_xlam(&row).unwrap();
        assert_eq!(r.messages.len(), 2);
        let props = &r.tools[0]["function"]["parameters"]["properties"];
        assert_eq!(props["type"]["type"], "string");
        assert_eq!(props["limit"]["type"], "integer");
        assert_eq!(props["ids"]["type"], "array");
        assert_eq!(props["ratio"]["type"], "number");
        assert_eq!(props["on"]["type"], "boolean");
        assert_eq!(props["meta"]["type"], "object");
        assert_eq!(props["when"]["type"], "string");
        let required = r.tools[0]["function"]["parameters"]["required"]
            .as_array()
            .unwrap();
        assert!(!required.contains(&json!("type")) && required.contains(&json!("limit")));
        let calls = r.expected_calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(
            calls[1],
            ("live_giveaways_by_type".into(), json!({"type": "game"}))
        );
        assert_eq!(r.eval_item().messages.len(), 1);
    }

    #[test]
    fn bfcl_questions_join_their_possible_answers() {
        let q = r#"{"id": "simple_0", "question": [[{"role": "user", "content": "Area of a triangle, base 10, height 5?"}]], "function": [{"name": "calculate_triangle_area", "description": "Area.", "parameters": {"type": "dict", "properties": {"base": {"type": "integer"}, "height": {"type": "float"}, "unit": {"type": "string"}, "pts": {"type": "tuple", "items": {"type": "float"}}}, "required": ["base", "height"]}}]}
{"id": "irrelevance_0", "question": [[{"role": "user", "content": "Tell me a joke"}]], "function": [{"name": "f", "parameters": {"type": "dict", "properties": {}}}]}"#;
        let a = r#"{"id": "simple_0", "ground_truth": [{"calculate_triangle_area": {"base": [10], "height": [5.0, 5], "unit": ["", "units"]}}]}"#;
        let recs = parse_bfcl(q, Some(a)).unwrap();
        assert_eq!(recs.len(), 2);
        let params = &recs[0].tools[0]["function"]["parameters"];
        assert_eq!(params["type"], "object");
        assert_eq!(params["properties"]["height"]["type"], "number");
        assert_eq!(params["properties"]["pts"]["type"], "array");
        assert_eq!(params["properties"]["pts"]["items"]["type"], "number");
        assert_eq!(
            recs[0].expected_calls(),
            vec![(
                "calculate_triangle_area".to_string(),
                json!({"base": 10, "height": 5.0})
            )]
        );
        assert!(recs[0].ground_truth.is_some());
        assert!(recs[1].expected_calls().is_empty());
        assert_eq!(recs[1].stratum(), "");
        let back = parse_openai_jsonl(&recs[0].to_json().to_string()).unwrap();
        assert_eq!(back[0], recs[0]);
    }

    #[test]
    fn malformed_rows_are_refused_with_their_row_number() {
        let good = r#"{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]}],"tools":[{"type":"function","function":{"name":"f"}}]}"#;
        let recs = parse_openai_jsonl(&format!("{good}\n\n{good}\n")).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0].messages[1]["tool_calls"][0]["function"]["arguments"],
            json!("{\"a\":1}")
        );
        let bad_args = good.replace(r#"{"a":1}"#, r#""{a:1""#);
        let e = parse_openai_jsonl(&format!("{good}\n{bad_args}")).unwrap_err();
        assert_eq!(e.row, 2);
        assert!(e.message.contains("arguments is not JSON"), "{}", e.message);
        let nameless = good.replace(
            r#"{"type":"function","function":{"name":"f"}}"#,
            r#"{"type":"function","function":{}}"#,
        );
        assert!(parse_openai_jsonl(&nameless)
            .unwrap_err()
            .message
            .contains("tools[0] has no function name"));
        let no_answer = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(parse_openai_jsonl(no_answer)
            .unwrap_err()
            .message
            .contains("last message"));
        assert_eq!(parse_openai_jsonl("{not json").unwrap_err().row, 1);
        assert!(
            parse_xlam(r#"{"query": "q", "tools": "[", "answers": "[]"}"#)
                .unwrap_err()
                .message
                .contains("'tools' is not valid JSON")
        );
    }

    #[test]
    fn splits_are_seeded_stratified_and_disjoint() {
        let mk = |tool: &str, i: usize| Record {
            messages: vec![
                json!({"role": "user", "content": format!("{tool} {i}")}),
                json!({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": tool, "arguments": "{}"}}]}),
            ],
            tools: vec![],
            tool_choice: None,
            ground_truth: None,
        };
        let mut recs: Vec<Record> = (0..30).map(|i| mk("a", i)).collect();
        recs.extend((0..10).map(|i| mk("b", i)));
        recs.push(mk("a", 0));
        let recs = dedup(recs);
        assert_eq!(recs.len(), 40);
        let s = split(&recs, 0.1, 0.2, 7);
        assert_eq!(
            (s.train.len(), s.validation.len(), s.test.len()),
            (28, 4, 8)
        );
        assert_eq!(s.test.iter().filter(|r| r.stratum() == "b").count(), 2);
        let again = split(&recs, 0.1, 0.2, 7);
        assert_eq!(s.test, again.test);
        let other = split(&recs, 0.1, 0.2, 8);
        assert_ne!(s.test, other.test);
        let mut all: Vec<String> = s
            .train
            .iter()
            .chain(&s.validation)
            .chain(&s.test)
            .map(Record::user_query)
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 40);
    }
}
