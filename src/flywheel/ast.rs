//! BFCL's AST check of tool calls against possible answers (`ast_accuracy`): the function name
//! matches; every required parameter is given and no unknown one; each given value is among the
//! parameter's acceptable values, compared by type (an integer is accepted where a number is
//! expected), with strings normalised (case, spaces and the punctuation `,./-_*^` ignored) and
//! lists and objects compared element by element; a parameter may be left out only when "" is
//! among its acceptable values; parallel calls match one to one in any order; and an item with no
//! possible answer (irrelevance) is right only when the model calls nothing.

use serde_json::Value;

/// A call the model made. `arguments` is `None` when its text did not parse as JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PredictedCall {
    pub name: String,
    pub arguments: Option<Value>,
    pub raw_arguments: String,
}

/// Strings compare after lower-casing and dropping spaces and `,./-_*^`.
fn normalise(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && !",./-_*^".contains(*c))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether `got` equals an acceptable value `want` under BFCL's comparison.
fn value_matches(got: &Value, want: &Value, ty: Option<&str>) -> bool {
    match (got, want) {
        (Value::String(g), Value::String(w)) => normalise(g) == normalise(w),
        (Value::Number(g), Value::Number(w)) => {
            // An integer where an integer is expected must be one; where a number (float) is
            // expected, integers are fine.
            if ty == Some("integer") && !(g.is_i64() || g.is_u64()) {
                return false;
            }
            match (g.as_f64(), w.as_f64()) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                _ => false,
            }
        }
        (Value::Bool(g), Value::Bool(w)) => g == w,
        (Value::Array(g), Value::Array(w)) => {
            g.len() == w.len() && g.iter().zip(w).all(|(a, b)| value_matches(a, b, None))
        }
        (Value::Object(g), Value::Object(w)) => {
            // Nested objects: every key of the answer, each value among its acceptable values.
            g.len() <= w.len()
                && w.iter().all(|(k, acceptable)| match g.get(k) {
                    Some(v) => one_of(v, acceptable, None),
                    None => allows_absent(acceptable),
                })
                && g.keys().all(|k| w.contains_key(k))
        }
        (Value::Null, Value::Null) => true,
        _ => false,
    }
}

/// `acceptable` is a list of acceptable values (BFCL's shape) or a single value.
fn one_of(got: &Value, acceptable: &Value, ty: Option<&str>) -> bool {
    match acceptable {
        Value::Array(options) => options.iter().any(|w| value_matches(got, w, ty)),
        w => value_matches(got, w, ty),
    }
}

fn allows_absent(acceptable: &Value) -> bool {
    acceptable
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("")))
}

/// The tool's documentation by name: its parameter types and required list.
fn tool_doc<'a>(tools: &'a [Value], name: &str) -> Option<&'a Value> {
    tools
        .iter()
        .map(|t| t.get("function").unwrap_or(t))
        .find(|f| f.get("name").and_then(Value::as_str) == Some(name))
}

/// One predicted call against one `{name: {param: [acceptable values]}}` answer.
fn call_matches(tools: &[Value], answer: &Value, call: &PredictedCall) -> bool {
    let Some((name, params)) = answer.as_object().and_then(|o| o.iter().next()) else {
        return false;
    };
    if call.name != *name {
        return false;
    }
    let Some(Value::Object(args)) = &call.arguments else {
        return false;
    };
    let Some(params) = params.as_object() else {
        return false;
    };
    let doc = tool_doc(tools, name);
    let props = doc.and_then(|d| d.pointer("/parameters/properties"));
    let required: Vec<&str> = doc
        .and_then(|d| d.pointer("/parameters/required"))
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // No parameter the function does not have (or the answer does not know).
    if args.keys().any(|k| !params.contains_key(k)) {
        return false;
    }
    if required.iter().any(|r| !args.contains_key(*r)) {
        return false;
    }
    params.iter().all(|(p, acceptable)| {
        let ty = props
            .and_then(|pr| pr.get(p))
            .and_then(|d| d.get("type"))
            .and_then(Value::as_str);
        match args.get(p) {
            Some(v) => one_of(v, acceptable, ty),
            None => allows_absent(acceptable),
        }
    })
}

/// BFCL's verdict for one item. `ground_truth` is `[{name: {param: [values]}}]`; `None` or an
/// empty list means the model should call nothing.
pub fn ast_match(
    tools: &[Value],
    ground_truth: Option<&Value>,
    predicted: &[PredictedCall],
) -> bool {
    let answers: &[Value] = ground_truth
        .and_then(Value::as_array)
        .map_or(&[], |a| a.as_slice());
    if answers.is_empty() {
        return predicted.is_empty();
    }
    if answers.len() != predicted.len() {
        return false;
    }
    let mut used = vec![false; predicted.len()];
    answers.iter().all(|a| {
        match (0..predicted.len()).find(|&i| !used[i] && call_matches(tools, a, &predicted[i])) {
            Some(i) => {
                used[i] = true;
                true
            }
            None => false,
        }
    })
}

/// Expected calls as a one-value-per-parameter ground truth (for items without BFCL answers).
pub fn ground_truth_of(expected: &[(String, Value)]) -> Value {
    Value::Array(
        expected
            .iter()
            .map(|(name, args)| {
                let params: serde_json::Map<String, Value> = args
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), Value::Array(vec![v.clone()])))
                    .collect();
                serde_json::json!({ name.clone(): params })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn call(name: &str, args: Value) -> PredictedCall {
        PredictedCall {
            name: name.into(),
            raw_arguments: args.to_string(),
            arguments: Some(args),
        }
    }

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "area", "parameters": {"type": "object",
            "properties": {"base": {"type": "integer"}, "height": {"type": "number"}, "unit": {"type": "string"},
                "tags": {"type": "array"}},
            "required": ["base", "height"]}}}),
        ]
    }

    #[test]
    fn bfcl_rules_types_optional_parameters_and_string_normalisation() {
        let t = tools();
        let gt = json!([{"area": {"base": [10], "height": [5.0], "unit": ["units", ""], "tags": [["a", "b"], ""]}}]);
        let ok = |args: Value| ast_match(&t, Some(&gt), &[call("area", args)]);
        assert!(ok(json!({"base": 10, "height": 5}))); // int where a number is expected
        assert!(ok(json!({"base": 10, "height": 5.0, "unit": "Units"}))); // case folded
        assert!(ok(json!({"base": 10, "height": 5.0, "tags": ["A", "b"]})));
        assert!(!ok(json!({"base": 10.0, "height": 5}))); // float where an integer is expected
        assert!(!ok(json!({"base": 10}))); // required parameter missing
        assert!(!ok(json!({"base": 10, "height": 5, "colour": "red"}))); // unknown parameter
        assert!(!ok(json!({"base": 11, "height": 5}))); // value not acceptable
        assert!(!ok(json!({"base": 10, "height": 5, "unit": "cm"})));
        assert!(!ok(json!({"base": 10, "height": 5, "tags": ["b", "a"]}))); // list order matters
        assert!(!ast_match(
            &t,
            Some(&gt),
            &[call("Area", json!({"base": 10, "height": 5}))]
        ));
        let s = json!([{"f": {"city": ["San Francisco, CA"]}}]);
        assert!(ast_match(
            &[],
            Some(&s),
            &[call("f", json!({"city": "san francisco ca"}))]
        ));
    }

    #[test]
    fn parallel_calls_match_one_to_one_and_irrelevance_wants_no_call() {
        let gt = json!([{"f": {"x": [1]}}, {"f": {"x": [2]}}]);
        let a = call("f", json!({"x": 1}));
        let b = call("f", json!({"x": 2}));
        assert!(ast_match(&[], Some(&gt), &[b.clone(), a.clone()]));
        assert!(!ast_match(&[], Some(&gt), &[a.clone(), a.clone()]));
        assert!(!ast_match(&[], Some(&gt), std::slice::from_ref(&a)));
        assert!(ast_match(&[], None, &[]));
        assert!(!ast_match(&[], Some(&json!([])), &[a]));
        let unparsed = PredictedCall {
            name: "f".into(),
            arguments: None,
            raw_arguments: "{x:".into(),
        };
        assert!(!ast_match(
            &[],
            Some(&json!([{"f": {"x": [1]}}])),
            &[unparsed]
        ));
        let expected = vec![("f".to_string(), json!({"x": 1}))];
        assert!(!ast_match(&[], Some(&ground_truth_of(&expected)), &[b]));
        assert!(ast_match(
            &[],
            Some(&ground_truth_of(&expected)),
            &[call("f", json!({"x": 1}))]
        ));
    }
}
