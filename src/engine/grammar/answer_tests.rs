//! Structured answers: the answer is one value of its format's schema, whatever the model's
//! logits; schemas the grammar cannot follow are refused naming the keyword.

use serde_json::{json, Value};

use super::tests::{lcg, random_walk, test_vocab};
use super::*;

fn format(schema: Value) -> Grammar {
    Grammar::new(None, Some(&AnswerFormat::JsonSchema(schema)))
        .unwrap()
        .unwrap()
}

/// The state after `text`, if the grammar takes all of it.
fn takes(g: &Grammar, text: &str) -> Option<GrammarState> {
    let mut s = GrammarState::new(g);
    text.bytes().all(|b| s.feed(g, b)).then_some(s)
}

fn complete(g: &Grammar, text: &str) -> bool {
    takes(g, text).is_some_and(|s| s.may_end(g))
}

/// A pydantic model with a nested model, an enum, a list, optional fields and a bounded number,
/// as pydantic 2 writes its JSON schema.
fn pydantic_schema() -> Value {
    json!({
        "$defs": {
            "Address": {"properties": {
                "city": {"title": "City", "type": "string"},
                "zip": {"anyOf": [{"type": "string", "pattern": "^[0-9]{5}$"}, {"type": "null"}], "default": null}
            }, "required": ["city"], "title": "Address", "type": "object"},
            "Kind": {"enum": ["person", "company"], "title": "Kind", "type": "string"}
        },
        "properties": {
            "name": {"title": "Name", "type": "string", "minLength": 1},
            "kind": {"$ref": "#/$defs/Kind"},
            "address": {"$ref": "#/$defs/Address"},
            "tags": {"items": {"type": "string"}, "title": "Tags", "type": "array", "maxItems": 3},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "born": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]}
        },
        "required": ["name", "kind", "address", "tags", "score"],
        "title": "Entity",
        "type": "object",
        "additionalProperties": false
    })
}

#[test]
fn an_answer_is_one_value_of_its_schema_and_the_turn_ends_only_after_it() {
    let g = format(pydantic_schema());
    let good = r#"{"name": "Ada", "kind": "person", "address": {"city": "Oslo", "zip": "01234"}, "tags": ["a"], "score": 0.75, "born": "1815-12-10"}"#;
    assert!(complete(&g, good));
    // Not yet whole: the turn may not end.
    assert!(!complete(&g, &good[..good.len() - 1]));
    assert!(takes(&g, &good[..good.len() - 1]).is_some());
    // Whitespace may follow the value, nothing else.
    assert!(complete(&g, &format!("{good}\n ")));
    assert!(takes(&g, &format!("{good} x")).is_none());
    for bad in [
        "Paris is a city",
        r#"{"name": "", "kind": "person""#,
        r#"{"name": "A", "kind": "robot""#,
        r#"{"name": "A", "extra": 1"#,
        r#"{"name": "A", "kind": "person", "address": {"city": "Oslo", "zip": "12"}"#,
        r#"{"name": "A", "tags": ["a", "b", "c", "d"]"#,
        r#"{"name": "A", "score": 1.5"#,
        r#"{"name": "A", "score": -0.1"#,
        r#"{"name": "A", "score": 1e-3"#,
        r#"{"name": "A", "born": "1815-13-10""#,
        r#"{"name": "A"}"#,
    ] {
        assert!(
            takes(&g, bad).is_none(),
            "{bad} should be refused before its end"
        );
    }
    // json_object: any object, and only an object.
    let obj = Grammar::new(None, Some(&AnswerFormat::JsonObject))
        .unwrap()
        .unwrap();
    assert!(complete(&obj, r#"{"x": [1, {"y": null}]}"#));
    assert!(takes(&obj, "[1]").is_none() && takes(&obj, "\"s\"").is_none());
}

#[test]
fn number_bounds_hold_for_fractions_and_exclusive_ends() {
    let unit = format(json!({"type": "number", "minimum": 0, "maximum": 1}));
    for ok in ["0", "1", "0.5", "0.999", "1.0", "0.00"] {
        assert!(complete(&unit, ok), "{ok}");
    }
    for bad in ["1.5", "2", "-0.1", "-1", "1.01"] {
        assert!(!complete(&unit, bad), "{bad}");
    }
    let open = format(json!({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}));
    assert!(complete(&open, "0.25"));
    assert!(!complete(&open, "0") && !complete(&open, "0.0") && !complete(&open, "1"));
    // Can still go on: 0.0 may become 0.01.
    assert!(takes(&open, "0.0").is_some());
    let neg = format(json!({"type": "number", "minimum": -2.5, "maximum": -1}));
    assert!(complete(&neg, "-2.5") && complete(&neg, "-1") && complete(&neg, "-1.75"));
    assert!(!complete(&neg, "-2.6") && !complete(&neg, "-0.5") && takes(&neg, "1").is_none());
    // A top-level number may end the turn once it is whole.
    let int = format(json!({"type": "integer", "minimum": 10, "maximum": 99}));
    assert!(complete(&int, "42") && !complete(&int, "4"));
}

#[test]
fn recursive_schemas_compile_to_finite_grammars() {
    let tree = format(json!({
        "$defs": {"Node": {"type": "object", "properties": {
            "label": {"type": "string"},
            "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}
        }, "required": ["label", "children"]}},
        "$ref": "#/$defs/Node"
    }));
    assert!(complete(
        &tree,
        r#"{"label": "a", "children": [{"label": "b", "children": []}]}"#
    ));
    assert!(takes(&tree, r#"{"label": "a", "children": [{"label": 1"#).is_none());
    // `#` itself, and a linked list ended by null.
    let list = format(json!({"type": "object", "properties": {
        "v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
        "required": ["v", "next"]}));
    assert!(complete(
        &list,
        r#"{"v": 1, "next": {"v": 2, "next": null}}"#
    ));
}

#[test]
fn what_cannot_be_enforced_or_satisfied_is_refused_naming_the_keyword() {
    let refused = |schema: Value| -> SchemaError {
        match Grammar::new(None, Some(&AnswerFormat::JsonSchema(schema.clone()))) {
            Err(e) => e,
            Ok(_) => panic!("{schema} should be refused"),
        }
    };
    let cases = [
        (json!({"type": "string", "format": "hostname"}), "format"),
        (
            json!({"type": "object", "properties": {"a": {"not": {}}}}),
            "properties.a.not",
        ),
        (
            json!({"type": "array", "items": {"type": "string"}, "uniqueItems": true}),
            "uniqueItems",
        ),
        (json!({"type": "strnig"}), "type"),
        (
            json!({"allOf": [{"type": "string"}, {"minLength": 2}]}),
            "allOf",
        ),
        (json!({"$ref": "#/$defs/missing"}), "$ref"),
        (json!({"enum": []}), "enum"),
        (
            json!({"type": "integer", "minimum": 5, "maximum": 4}),
            "minimum",
        ),
        (json!({"type": "string", "pattern": "(?=a)b"}), "pattern"),
        (json!({"minLength": 3}), "minLength"),
        (
            json!({"properties": {"a": {"$ref": "#/$defs/x", "minimum": 1}}, "$defs": {"x": {"type": "integer"}}}),
            "properties.a.minimum",
        ),
        // Only references, round and round.
        (
            json!({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"}),
            "$ref",
        ),
    ];
    for (schema, path) in cases {
        let e = refused(schema.clone());
        assert_eq!(e.path, path, "{schema}: {e}");
    }
    // Satisfiable only by an infinite value.
    let e = refused(
        json!({"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}),
    );
    assert!(e.message.contains("no JSON value"), "{e}");
    // The same keywords in a tool's parameters leave the value free instead.
    let tools = vec![
        json!({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"h": {"type": "string", "format": "hostname"}, "n": {"not": {}}}}}}),
    ];
    assert!(Grammar::for_tools(&tools, None, true).is_some());
}

#[test]
fn an_unsatisfiable_optional_part_is_never_started() {
    let g = format(json!({"type": "object", "properties": {
        "ok": {"type": "integer"},
        "never": {"type": "object", "properties": {"x": {"$ref": "#/properties/never"}}, "required": ["x"]}
    }}));
    assert!(complete(&g, r#"{"ok": 1}"#));
    assert!(takes(&g, r#"{"never""#).is_none());
}

#[test]
fn with_tools_the_answer_is_calls_or_the_value() {
    let tools = vec![
        json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}),
    ];
    let spec = ToolSpec {
        tools: &tools,
        choice: None,
        parallel: true,
        syntax: CallSyntax::Hermes,
    };
    let f = AnswerFormat::JsonSchema(
        json!({"type": "object", "properties": {"t": {"type": "string"}}, "required": ["t"]}),
    );
    let g = Grammar::new(Some(spec), Some(&f)).unwrap().unwrap();
    assert!(complete(&g, r#"{"t": "noon"}"#));
    assert!(complete(
        &g,
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>"
    ));
    assert!(takes(&g, "It is noon").is_none());
    // A forced call leaves no room for the value.
    let forced = ToolSpec {
        choice: Some(&json!("required")),
        ..spec
    };
    let g = Grammar::new(Some(forced), Some(&f)).unwrap().unwrap();
    assert!(takes(&g, r#"{"t""#).is_none());
}

#[test]
fn random_models_under_the_mask_always_write_valid_answers() {
    let g = format(pydantic_schema());
    let vocab = test_vocab();
    let mut rng = 11u64;
    for trial in 0..200 {
        let text = random_walk(&g, &vocab, &mut rng);
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("trial {trial}: {e}: {text}"));
        let o = v.as_object().unwrap();
        assert!(o["name"].as_str().is_some_and(|n| !n.is_empty()), "{text}");
        assert!(o["kind"] == "person" || o["kind"] == "company", "{text}");
        assert!(o["address"]["city"].is_string(), "{text}");
        assert!(o["tags"].as_array().is_some_and(|t| t.len() <= 3), "{text}");
        let score = o["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{text}");
        let allowed = ["name", "kind", "address", "tags", "score", "born"];
        assert!(o.keys().all(|k| allowed.contains(&k.as_str())), "{text}");
    }
}

fn pick(rng: &mut u64, n: usize) -> usize {
    (lcg(rng) * n as f32) as usize % n
}

/// A random JSON value built from schema keywords and odd values, for fuzzing the compiler.
fn random_schema(rng: &mut u64, depth: usize) -> Value {
    let keys = [
        "type",
        "properties",
        "required",
        "items",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "minLength",
        "maxLength",
        "minItems",
        "maxItems",
        "pattern",
        "format",
        "additionalProperties",
        "not",
        "title",
    ];
    let leaves = [
        json!("string"),
        json!("number"),
        json!("integer"),
        json!("object"),
        json!("array"),
        json!("null"),
        json!("boolean"),
        json!("nope"),
        json!(-3),
        json!(0),
        json!(2.5),
        json!(1e300),
        json!(true),
        json!(false),
        json!(null),
        json!([]),
        json!({}),
        json!("#"),
        json!("#/$defs/a"),
        json!("#/properties"),
        json!("date"),
        json!("[a-z]+"),
        json!("(?=x)"),
        json!(["string", "null"]),
        json!(["a"]),
    ];
    if depth > 3 || pick(rng, 4) == 0 {
        return leaves[pick(rng, leaves.len())].clone();
    }
    let mut o = serde_json::Map::new();
    for _ in 0..1 + pick(rng, 4) {
        let k = keys[pick(rng, keys.len())];
        let v = match pick(rng, 3) {
            0 => leaves[pick(rng, leaves.len())].clone(),
            1 => Value::Array(
                (0..pick(rng, 3))
                    .map(|_| random_schema(rng, depth + 1))
                    .collect(),
            ),
            _ => {
                let mut m = serde_json::Map::new();
                for i in 0..pick(rng, 3) {
                    m.insert(
                        ["a", "b", "x"][i].to_string(),
                        random_schema(rng, depth + 1),
                    );
                }
                Value::Object(m)
            }
        };
        o.insert(k.to_string(), v);
    }
    Value::Object(o)
}

#[test]
fn random_schemas_compile_or_are_refused_and_never_trap_a_model() {
    let vocab = test_vocab();
    let mut rng = 5u64;
    let (mut taken, mut refused) = (0, 0);
    for _ in 0..3000 {
        let schema = random_schema(&mut rng, 0);
        let tools = vec![
            json!({"type": "function", "function": {"name": "f", "parameters": schema.clone()}}),
        ];
        // Tools take any schema (what is not enforced is left free).
        assert!(
            Grammar::for_tools(&tools, Some(&json!("required")), true).is_some(),
            "{schema}"
        );
        match Grammar::new(None, Some(&AnswerFormat::JsonSchema(schema.clone()))) {
            Ok(Some(g)) => {
                taken += 1;
                // A model under the mask can always go on, and what it finishes is JSON.
                let mut s = GrammarState::new(&g);
                let mut text = Vec::new();
                for _ in 0..400 {
                    let mut logits: Vec<f32> =
                        (0..vocab.bytes.len()).map(|_| lcg(&mut rng)).collect();
                    s.mask(&g, &vocab, &mut logits);
                    let t = crate::engine::sampling::argmax(&logits);
                    assert!(
                        logits[t as usize].is_finite(),
                        "{schema}: stuck after {:?}",
                        String::from_utf8_lossy(&text)
                    );
                    if vocab.eos.contains(&t) {
                        let done = String::from_utf8(text.clone()).unwrap();
                        assert!(
                            serde_json::from_str::<Value>(&done).is_ok(),
                            "{schema}: {done}"
                        );
                        break;
                    }
                    text.extend_from_slice(vocab.bytes(t));
                    s.advance(&g, vocab.bytes(t));
                }
            }
            Ok(None) => panic!("a format always makes a grammar"),
            Err(e) => {
                refused += 1;
                assert!(!e.message.is_empty());
            }
        }
    }
    println!("random schemas: {taken} compiled, {refused} refused");
    assert!(taken > 100 && refused > 100, "{taken} / {refused}");
}
