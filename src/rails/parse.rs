//! Reading a safety model's answer. Every parser fails closed: only an answer that says "safe" in
//! the format the parser expects lets content through; prose, truncation and anything unexpected
//! come back as [`SafetyVerdict::Malformed`], which blocks.

use serde_json::Value;

/// What a safety model said about the content it was shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SafetyVerdict {
    Safe,
    Unsafe(Vec<String>),
    /// The answer could not be read as a verdict (the text is kept, shortened, for the record).
    Malformed(String),
}

/// The output parsers a prompt may name (`output_parser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputParser {
    /// NemoGuard content safety: a JSON object whose `"User Safety"` must be exactly `safe`
    /// (case-insensitive); categories from `"Safety Categories"`. Code fences are tolerated.
    NemoGuardJson,
    /// The same, reading `"Response Safety"`: the verdict on the model's answer (output rails).
    NemoGuardResponseJson,
    /// Llama Guard: first line `safe`, or `unsafe` with the violated categories (`S1,S2`) on the next.
    LlamaGuard,
    /// Nemotron safety guard's line format: `User Safety: safe|unsafe` and
    /// `Safety Categories: a, b`.
    NemotronLines,
    /// The same lines, reading `Response Safety` (never falling back to the user's verdict).
    NemotronResponseLines,
}

impl OutputParser {
    /// The names a guardrail config may use, with the parser each means.
    pub const NAMES: &'static [(&'static str, OutputParser)] = &[
        ("nemoguard_parse_prompt_safety", OutputParser::NemoGuardJson),
        (
            "nemoguard_parse_response_safety",
            OutputParser::NemoGuardResponseJson,
        ),
        ("is_content_safe", OutputParser::LlamaGuard),
        ("llama_guard", OutputParser::LlamaGuard),
        (
            "nemotron_content_safety_parse_prompt_safety",
            OutputParser::NemotronLines,
        ),
        (
            "nemotron_content_safety_parse_response_safety",
            OutputParser::NemotronResponseLines,
        ),
    ];

    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
    }

    pub fn parse(self, answer: &str) -> SafetyVerdict {
        match self {
            OutputParser::NemoGuardJson => parse_nemoguard_json(answer, USER),
            OutputParser::NemoGuardResponseJson => parse_nemoguard_json(answer, RESPONSE),
            OutputParser::LlamaGuard => parse_llama_guard(answer),
            OutputParser::NemotronLines => parse_nemotron_lines(answer, USER),
            OutputParser::NemotronResponseLines => parse_nemotron_lines(answer, RESPONSE),
        }
    }
}

/// The verdict fields of NemoGuard-style answers: on the user's message, and on the model's answer.
const USER: &str = "User Safety";
const RESPONSE: &str = "Response Safety";

fn malformed(answer: &str) -> SafetyVerdict {
    let mut s: String = answer.trim().chars().take(200).collect();
    if answer.trim().chars().count() > 200 {
        s.push('…');
    }
    SafetyVerdict::Malformed(s)
}

/// Splits a comma-separated category list, dropping blanks.
fn categories(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// The JSON object inside an answer that may wrap it in a Markdown code fence.
fn json_body(answer: &str) -> &str {
    let t = answer.trim();
    let Some(rest) = t.strip_prefix("```") else {
        return t;
    };
    // Drop an info string such as `json` on the opening fence line.
    let rest = rest.split_once('\n').map_or("", |(_, body)| body);
    rest.trim_end().strip_suffix("```").unwrap_or(rest).trim()
}

fn parse_nemoguard_json(answer: &str, field: &str) -> SafetyVerdict {
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(json_body(answer)) else {
        return malformed(answer);
    };
    let Some(rating) = obj.get(field).and_then(Value::as_str) else {
        return malformed(answer);
    };
    if rating.trim().eq_ignore_ascii_case("safe") {
        return SafetyVerdict::Safe;
    }
    let cats = match obj.get("Safety Categories") {
        Some(Value::String(s)) => categories(s),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .flat_map(categories)
            .collect(),
        _ => Vec::new(),
    };
    SafetyVerdict::Unsafe(cats)
}

fn parse_llama_guard(answer: &str) -> SafetyVerdict {
    let mut lines = answer
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty());
    match lines.next().map(str::to_ascii_lowercase).as_deref() {
        Some("safe") => SafetyVerdict::Safe,
        Some("unsafe") => SafetyVerdict::Unsafe(lines.next().map(categories).unwrap_or_default()),
        _ => malformed(answer),
    }
}

fn parse_nemotron_lines(answer: &str, verdict: &str) -> SafetyVerdict {
    let field = |name: &str| -> Vec<String> {
        answer
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
            .collect()
    };
    // A verdict stated twice (either of them) cannot be trusted either way.
    if field(USER).len() > 1 || field(RESPONSE).len() > 1 {
        return malformed(answer);
    }
    let ratings = field(verdict);
    let [rating] = ratings.as_slice() else {
        return malformed(answer);
    };
    match rating.to_ascii_lowercase().as_str() {
        "safe" => SafetyVerdict::Safe,
        "unsafe" => SafetyVerdict::Unsafe(
            field("Safety Categories")
                .first()
                .map(|c| categories(c))
                .unwrap_or_default(),
        ),
        _ => malformed(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unsafe_(c: &[&str]) -> SafetyVerdict {
        SafetyVerdict::Unsafe(c.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn nemoguard_json_passes_only_an_exact_safe() {
        let p = OutputParser::NemoGuardJson;
        assert_eq!(p.parse(r#"{"User Safety": "safe"}"#), SafetyVerdict::Safe);
        assert_eq!(p.parse(r#" {"User Safety": "Safe"} "#), SafetyVerdict::Safe);
        assert_eq!(
            p.parse(r#"{"User Safety": "unsafe", "Safety Categories": "Violence, Criminal Planning/Confessions"}"#),
            unsafe_(&["Violence", "Criminal Planning/Confessions"])
        );
        assert_eq!(p.parse(r#"{"User Safety": "unsafe"}"#), unsafe_(&[]));
        // Anything but "safe" is unsafe, even a near miss.
        assert_eq!(p.parse(r#"{"User Safety": "mostly safe"}"#), unsafe_(&[]));
        assert_eq!(
            p.parse("```json\n{\"User Safety\": \"unsafe\", \"Safety Categories\": \"S17\"}\n```"),
            unsafe_(&["S17"])
        );
        assert_eq!(
            p.parse("```\n{\"User Safety\": \"safe\"}\n```"),
            SafetyVerdict::Safe
        );
        for bad in [
            "The user message is safe.",
            r#"{"Response Safety": "safe"}"#,
            r#"{"User Safety": "saf"#,
            "",
            "[\"safe\"]",
            r#"{"User Safety": true}"#,
        ] {
            assert!(
                matches!(p.parse(bad), SafetyVerdict::Malformed(_)),
                "{bad:?} must not pass"
            );
        }
    }

    #[test]
    fn llama_guard_reads_the_first_line_and_the_categories() {
        let p = OutputParser::LlamaGuard;
        assert_eq!(p.parse("safe"), SafetyVerdict::Safe);
        assert_eq!(p.parse("\n\nsafe\n"), SafetyVerdict::Safe);
        assert_eq!(p.parse("unsafe\nS1,S10"), unsafe_(&["S1", "S10"]));
        assert_eq!(p.parse("unsafe"), unsafe_(&[]));
        assert!(matches!(
            p.parse("I think this is safe"),
            SafetyVerdict::Malformed(_)
        ));
        assert!(matches!(p.parse("safe-ish"), SafetyVerdict::Malformed(_)));
    }

    #[test]
    fn nemotron_lines_refuse_a_verdict_stated_twice() {
        let p = OutputParser::NemotronLines;
        assert_eq!(p.parse("User Safety: safe"), SafetyVerdict::Safe);
        assert_eq!(
            p.parse("User Safety: unsafe\nSafety Categories: Violence, Threat"),
            unsafe_(&["Violence", "Threat"])
        );
        assert!(matches!(
            p.parse("User Safety: unsafe\nUser Safety: safe"),
            SafetyVerdict::Malformed(_)
        ));
        assert!(matches!(p.parse("looks fine"), SafetyVerdict::Malformed(_)));
    }

    #[test]
    fn response_parsers_read_the_answer_verdict_only() {
        let p = OutputParser::NemoGuardResponseJson;
        assert_eq!(
            p.parse(r#"{"User Safety": "unsafe", "Response Safety": "safe"}"#),
            SafetyVerdict::Safe
        );
        assert_eq!(
            p.parse(r#"{"User Safety": "safe", "Response Safety": "unsafe", "Safety Categories": "PII/Privacy"}"#),
            unsafe_(&["PII/Privacy"])
        );
        // A verdict on the user alone says nothing about the answer.
        assert!(matches!(
            p.parse(r#"{"User Safety": "safe"}"#),
            SafetyVerdict::Malformed(_)
        ));
        let lines = OutputParser::NemotronResponseLines;
        assert_eq!(
            lines.parse("User Safety: unsafe\nResponse Safety: safe"),
            SafetyVerdict::Safe
        );
        assert_eq!(
            lines.parse("User Safety: safe\nResponse Safety: unsafe\nSafety Categories: Violence"),
            unsafe_(&["Violence"])
        );
        assert!(matches!(
            lines.parse("User Safety: safe"),
            SafetyVerdict::Malformed(_)
        ));
        assert!(matches!(
            lines.parse("Response Safety: safe\nResponse Safety: unsafe"),
            SafetyVerdict::Malformed(_)
        ));
    }

    #[test]
    fn parser_names_resolve() {
        assert_eq!(
            OutputParser::from_name("nemoguard_parse_prompt_safety"),
            Some(OutputParser::NemoGuardJson)
        );
        assert_eq!(OutputParser::from_name("nope"), None);
    }
}
