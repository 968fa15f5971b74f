//! Tool-call agreement between two answers to the same request (primary vs shadow): the same
//! function names, and the same names with the same arguments, order-free across parallel calls.

use serde_json::Value;

use crate::wire::tool_calls::in_completion as tool_calls;

/// `(names agree, names and arguments agree)`, or `None` when neither answer called a tool.
pub fn tool_call_agreement(primary: &Value, other: &Value) -> Option<(bool, bool)> {
    let a: Vec<_> = tool_calls(Some(primary))
        .into_iter()
        .filter(|c| c.choice_index == 0)
        .collect();
    let b: Vec<_> = tool_calls(Some(other))
        .into_iter()
        .filter(|c| c.choice_index == 0)
        .collect();
    if a.is_empty() && b.is_empty() {
        return None;
    }
    let mut names_a: Vec<&str> = a.iter().map(|c| c.name.as_str()).collect();
    let mut names_b: Vec<&str> = b.iter().map(|c| c.name.as_str()).collect();
    names_a.sort_unstable();
    names_b.sort_unstable();
    let names = names_a == names_b;
    if !names {
        return Some((false, false));
    }
    // Arguments compare as JSON values (key order and whitespace do not matter); unparsable
    // arguments compare as raw text.
    let parse =
        |s: &str| serde_json::from_str::<Value>(s).unwrap_or_else(|_| Value::String(s.to_string()));
    let mut unmatched: Vec<(String, Value)> = b
        .iter()
        .map(|c| (c.name.clone(), parse(&c.arguments)))
        .collect();
    for call in &a {
        let args = parse(&call.arguments);
        match unmatched
            .iter()
            .position(|(n, v)| *n == call.name && *v == args)
        {
            Some(i) => {
                unmatched.swap_remove(i);
            }
            None => return Some((true, false)),
        }
    }
    Some((true, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn answer(calls: &[(&str, &str)]) -> Value {
        let calls: Vec<Value> = calls
            .iter()
            .map(|(n, a)| json!({"id": "x", "type": "function", "function": {"name": n, "arguments": a}}))
            .collect();
        json!({"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": calls}}]})
    }

    #[test]
    fn order_and_key_order_do_not_matter() {
        let a = answer(&[("f", r#"{"x":1,"y":2}"#), ("g", "{}")]);
        let b = answer(&[("g", "{ }"), ("f", r#"{"y":2,"x":1}"#)]);
        assert_eq!(tool_call_agreement(&a, &b), Some((true, true)));
    }

    #[test]
    fn different_arguments_agree_on_names_only() {
        let a = answer(&[("f", r#"{"x":1}"#)]);
        let b = answer(&[("f", r#"{"x":2}"#)]);
        assert_eq!(tool_call_agreement(&a, &b), Some((true, false)));
        let c = answer(&[("g", r#"{"x":1}"#)]);
        assert_eq!(tool_call_agreement(&a, &c), Some((false, false)));
        let none =
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]});
        assert_eq!(tool_call_agreement(&a, &none), Some((false, false)));
        assert_eq!(tool_call_agreement(&none, &none), None);
    }
}
