//! Compiling what a request may write into the tables the automaton runs on: the tools' parameter
//! schemas and a structured answer's schema, by one compiler. Tool schemas compile leniently (a
//! keyword the automaton cannot enforce leaves that value free JSON of its type, as providers
//! treat tool schemas as guidance); an answer's schema compiles strictly (such a keyword is refused,
//! naming it, because the client will validate what it gets).
//!
//! `$ref` (local `#...` pointers, `$defs` and `definitions`) compiles each target once, so
//! recursive schemas (trees, linked lists) are finite tables. Two checks run on each compiled root:
//! a `$ref`/`anyOf` cycle that never reaches a value is refused, and so is a schema no finite JSON
//! value satisfies (a required property whose schema is unsatisfiable, `enum: []`, `minimum` above
//! `maximum`, ...); parts that can never complete (an optional property, an alternative, array
//! items) are pruned, so a model under the mask can always finish what it starts.

use std::collections::HashMap;

use regex_automata::dfa::{dense, Automaton};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};
use serde_json::Value;

use super::{CLOSE, MAX_DEPTH, MAX_LITERALS, OPEN};

pub(super) type SchemaId = u32;
pub(super) type LitId = u32;

pub(super) enum Schema {
    Any,
    /// Closed to its declared keys (`keys`, serialized with quotes), each with its value schema.
    /// `blocked` keys are never written (their values cannot complete).
    Object {
        keys: LitId,
        values: Vec<SchemaId>,
        required: u64,
        blocked: u64,
    },
    /// Any keys, each value of this schema.
    Map(SchemaId),
    Array {
        items: SchemaId,
        min: u32,
        max: u32,
    },
    /// Between `min` and `max` characters (Unicode code points, as JSON Schema counts them),
    /// matching `pattern` (an index into `Grammar::patterns`) if there is one.
    String {
        min: u32,
        max: u32,
        pattern: Option<u32>,
    },
    /// An integer within `lo..=hi`, or a number without bounds.
    Number {
        integer: bool,
        lo: i64,
        hi: i64,
    },
    /// A number within bounds (written without an exponent).
    Decimal(Bounds),
    /// One of these serialized values, byte for byte.
    Literals(LitId),
    /// The first alternative that can start with the value's first byte.
    Union(Vec<SchemaId>),
    /// Another schema (a `$ref`), followed when a value starts.
    Ref(SchemaId),
}

/// A number's bounds, each inclusive or not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Bounds {
    pub lo: f64,
    pub hi: f64,
    pub lo_open: bool,
    pub hi_open: bool,
}

impl Bounds {
    /// Whether some value in `a..b` (`a` itself included; `b` too when `b_incl`) is in bounds.
    pub fn meets(&self, a: f64, b: f64, b_incl: bool) -> bool {
        let (lower, lower_incl) = if a > self.lo {
            (a, true)
        } else {
            (self.lo, !self.lo_open)
        };
        let (upper, upper_incl) = if b < self.hi {
            (b, b_incl)
        } else if b > self.hi {
            (self.hi, !self.hi_open)
        } else {
            (b, b_incl && !self.hi_open)
        };
        lower < upper || (lower == upper && lower_incl && upper_incl)
    }

    /// The bounds of the negated value.
    pub fn negated(&self) -> Bounds {
        Bounds {
            lo: -self.hi,
            hi: -self.lo,
            lo_open: self.hi_open,
            hi_open: self.lo_open,
        }
    }
}

/// What the answer itself must be, from a request's `response_format`.
#[derive(Debug, Clone, PartialEq)]
pub enum AnswerFormat {
    /// `json_object`: one JSON object.
    JsonObject,
    /// `json_schema`: a JSON value valid against this schema.
    JsonSchema(Value),
}

impl AnswerFormat {
    /// From a chat `response_format`: `None` for text (or none given).
    pub fn from_response_format(rf: Option<&Value>) -> Option<Self> {
        let rf = rf?;
        match rf.get("type")?.as_str()? {
            "json_object" => Some(Self::JsonObject),
            "json_schema" => Some(match rf.pointer("/json_schema/schema") {
                Some(s) => Self::JsonSchema(s.clone()),
                None => Self::JsonObject,
            }),
            _ => None,
        }
    }
}

/// The tools a request offers and how it lets the model call them.
#[derive(Clone, Copy)]
pub struct ToolSpec<'a> {
    /// OpenAI function tools.
    pub tools: &'a [Value],
    /// `tool_choice`.
    pub choice: Option<&'a Value>,
    /// `parallel_tool_calls` (a named choice makes one call regardless).
    pub parallel: bool,
    /// How the model writes a call.
    pub syntax: CallSyntax,
}

/// The call syntaxes the grammar writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CallSyntax {
    /// `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks, anywhere in the answer.
    #[default]
    Hermes,
    /// Llama 3's bare `{"name": ..., "parameters": ...}`: the whole answer, one call, or text.
    Json,
}

/// Part of an answer's schema the grammar cannot enforce or no value satisfies: where it is (a
/// dotted path into the schema, ending with the keyword; empty for the schema as a whole) and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} (at '{path}')")]
pub struct SchemaError {
    pub path: String,
    pub message: String,
}

/// What one request may write, compiled once per request: its tool calls, its answer's format,
/// or both (then the answer is either calls or the formatted value).
pub struct Grammar {
    pub(super) schemas: Vec<Schema>,
    pub(super) lits: Vec<Vec<Vec<u8>>>,
    /// The tool names (serialized), and each one's arguments schema.
    pub(super) names: LitId,
    pub(super) args: Vec<SchemaId>,
    /// The answer must open with a call (`tool_choice` required or named).
    pub(super) forced: bool,
    /// More than one call may be made (`parallel_tool_calls`, not a named choice).
    pub(super) parallel: bool,
    /// Calls are Llama 3's bare JSON objects, which only the answer's start may open.
    pub(super) json_calls: bool,
    /// The answer's schema, when it must be JSON (a structured output).
    pub(super) format: Option<SchemaId>,
    pub(super) any: SchemaId,
    pub(super) any_word: LitId,
    pub(super) name_key: LitId,
    pub(super) args_key: LitId,
    pub(super) open: LitId,
    pub(super) close: LitId,
    /// Compiled `pattern`s: each matches a whole string that contains a match of its pattern.
    pub(super) patterns: Vec<Pattern>,
    /// The answer opens inside a thinking model's reasoning: the grammar applies after it.
    pub(super) after_reasoning: bool,
}

/// A string schema's `pattern` as a DFA over the string's decoded bytes. A pattern that no string
/// within the schema's length bounds matches can leave a string with no way on; `mask` then
/// leaves the model free rather than pick from nothing, and the parser reports what it wrote.
pub(super) struct Pattern {
    dfa: dense::DFA<Vec<u32>>,
    pub start: StateID,
}

/// `pattern` with ECMA-262's ASCII meanings of `\d`, `\D`, `\w` and `\W` spelled out (the regex
/// engine's are Unicode-wide: a model could write digits a JSON Schema validator refuses).
fn ecma_classes(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str("[0-9]"),
            Some('D') => out.push_str("[^0-9]"),
            Some('w') => out.push_str("[0-9A-Za-z_]"),
            Some('W') => out.push_str("[^0-9A-Za-z_]"),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Bounds on building one pattern's DFA (bytes): past them the pattern is not enforced.
const PATTERN_LIMIT: usize = 1 << 20;

impl Pattern {
    /// `None` when the pattern is not one the regex engine takes (look-around, back-references)
    /// or its automaton is too large.
    fn new(pattern: &str) -> Option<Self> {
        // JSON Schema patterns are not anchored: the string must contain a match. The DFA runs
        // over the whole string, anchored at both ends.
        let whole = format!(r"^(?s:.*?)(?:{})(?s:.*)$", ecma_classes(pattern));
        let dfa = dense::Builder::new()
            .configure(
                dense::Config::new()
                    .match_kind(MatchKind::All)
                    .minimize(true)
                    .start_kind(regex_automata::dfa::StartKind::Anchored)
                    .dfa_size_limit(Some(PATTERN_LIMIT))
                    .determinize_size_limit(Some(PATTERN_LIMIT)),
            )
            .build(&whole)
            .ok()?;
        let start = dfa
            .start_state(&start::Config::new().anchored(Anchored::Yes))
            .ok()?;
        Some(Self { dfa, start })
    }

    /// The state after `bytes` from `at`, or `None` once no string going on this way can match.
    pub fn step(&self, mut at: StateID, bytes: &[u8]) -> Option<StateID> {
        for &b in bytes {
            at = self.dfa.next_state(at, b);
            if self.dfa.is_dead_state(at) || self.dfa.is_quit_state(at) {
                return None;
            }
        }
        Some(at)
    }

    /// Whether a string that ends at `at` matches.
    pub fn accepts(&self, at: StateID) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(at))
    }
}

/// The `format`s enforced, as patterns every value they admit is valid under (dates keep to days
/// 1-28 so no month can refuse them).
fn format_pattern(format: &str) -> Option<&'static str> {
    Some(match format {
        "date" => r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])$",
        "time" => {
            r"^([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
        }
        "date-time" => {
            r"^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
        }
        "uuid" => r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        "email" => {
            r"^[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})*\.[A-Za-z]{2,24}$"
        }
        "ipv4" => {
            r"^((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])$"
        }
        _ => return None,
    })
}

/// Keywords that describe a schema without constraining it.
const ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "$defs",
    "definitions",
    "deprecated",
    "readOnly",
    "writeOnly",
    "discriminator",
];

/// Keywords the grammar enforces (each checked where it is read).
const ENFORCED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
];

/// Keywords that constrain only values of one type: without a `type` they would be ignored.
const TYPED_KEYWORDS: &[&str] = &[
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "required",
    "additionalProperties",
];

fn serialized(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl Grammar {
    /// The grammar for a request's tool calls under its `tool_choice`: `None` when no call can
    /// be made (no tools, `none`) or there are more than 64 tools. Schema keywords the automaton
    /// cannot enforce leave those values free.
    pub fn for_tools(tools: &[Value], tool_choice: Option<&Value>, parallel: bool) -> Option<Self> {
        let spec = ToolSpec {
            tools,
            choice: tool_choice,
            parallel,
            syntax: CallSyntax::Hermes,
        };
        Self::new(Some(spec), None).ok().flatten()
    }

    /// The grammar for a request: its tool calls (when `tools` offers any) and its answer's
    /// format (when it must be JSON). `Ok(None)` when neither constrains anything; an error when
    /// the format's schema uses a keyword the grammar cannot enforce, or admits no value.
    pub fn new(
        tools: Option<ToolSpec<'_>>,
        format: Option<&AnswerFormat>,
    ) -> Result<Option<Self>, SchemaError> {
        let choice = tools.and_then(|t| t.choice);
        let named = choice
            .and_then(|c| c.pointer("/function/name"))
            .and_then(Value::as_str);
        let no_calls = choice.and_then(Value::as_str) == Some("none");
        let mut g = Grammar {
            schemas: Vec::new(),
            lits: Vec::new(),
            names: 0,
            args: Vec::new(),
            forced: false,
            json_calls: tools.is_some_and(|t| t.syntax == CallSyntax::Json),
            parallel: tools.is_some_and(|t| t.parallel && t.syntax == CallSyntax::Hermes)
                && named.is_none(),
            format: None,
            any: 0,
            any_word: 0,
            name_key: 0,
            args_key: 0,
            open: 0,
            close: 0,
            patterns: Vec::new(),
            after_reasoning: false,
        };
        g.any = g.push(Schema::Any);
        g.any_word = g.lit(vec![b"true".to_vec(), b"false".to_vec(), b"null".to_vec()]);
        g.name_key = g.lit(vec![b"\"name\"".to_vec()]);
        g.args_key = match g.json_calls {
            true => g.lit(vec![b"\"parameters\"".to_vec()]),
            false => g.lit(vec![b"\"arguments\"".to_vec()]),
        };
        g.open = g.lit(vec![OPEN.to_vec()]);
        g.close = g.lit(vec![CLOSE.to_vec()]);
        let mut names = Vec::new();
        for t in tools.filter(|_| !no_calls).map_or(&[][..], |t| t.tools) {
            let f = t.get("function").unwrap_or(t);
            let Some(name) = f.get("name").and_then(Value::as_str) else {
                continue;
            };
            if named.is_some_and(|n| n != name) {
                continue;
            }
            let params = f.get("parameters").cloned().unwrap_or(Value::Null);
            let schema = match params {
                Value::Object(_) => Compiler::new(&mut g, &params, false).root(&params, "")?,
                _ => g.push(Schema::Map(g.any)),
            };
            names.push(serialized(&Value::String(name.to_string())));
            g.args.push(schema);
        }
        let calls = !names.is_empty() && names.len() <= MAX_LITERALS;
        if calls {
            g.names = g.lit(names);
            g.forced = named.is_some() || choice.and_then(Value::as_str) == Some("required");
        } else {
            g.args.clear();
            g.names = g.lit(Vec::new());
            g.parallel = false;
        }
        // A forced call leaves no room for a formatted answer.
        if !g.forced {
            g.format = match format {
                Some(AnswerFormat::JsonObject) => Some(g.push(Schema::Map(g.any))),
                Some(AnswerFormat::JsonSchema(s)) => {
                    Some(Compiler::new(&mut g, s, true).root(s, "")?)
                }
                None => None,
            };
        }
        Ok((calls || g.format.is_some()).then_some(g))
    }

    /// The same grammar for a model that reasons before it answers (Qwen3): the reasoning, up
    /// to `</think>`, is free; the answer after it is held to the grammar.
    pub fn after_reasoning(mut self) -> Self {
        self.after_reasoning = true;
        self
    }

    /// Whether the model may call tools.
    pub(super) fn has_calls(&self) -> bool {
        !self.args.is_empty()
    }

    /// A string frame's pattern and automaton state, with the compiled pattern.
    pub(super) fn pattern_at(&self, at: Option<(u32, StateID)>) -> Option<(&Pattern, StateID)> {
        at.and_then(|(p, state)| Some((self.patterns.get(p as usize)?, state)))
    }

    fn push(&mut self, s: Schema) -> SchemaId {
        self.schemas.push(s);
        (self.schemas.len() - 1) as SchemaId
    }

    fn lit(&mut self, l: Vec<Vec<u8>>) -> LitId {
        self.lits.push(l);
        (self.lits.len() - 1) as LitId
    }

    /// Whether a value of schema `id` can begin with byte `b`.
    pub(super) fn starts(&self, id: SchemaId, b: u8) -> bool {
        match &self.schemas[id as usize] {
            Schema::Any => matches!(
                b,
                b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'
            ),
            Schema::Object { .. } | Schema::Map(_) => b == b'{',
            Schema::Array { .. } => b == b'[',
            Schema::String { .. } => b == b'"',
            Schema::Number { .. } | Schema::Decimal(_) => b == b'-' || b.is_ascii_digit(),
            Schema::Literals(l) => self.lits[*l as usize].iter().any(|c| c.first() == Some(&b)),
            Schema::Union(alts) => alts.iter().any(|a| self.starts(*a, b)),
            Schema::Ref(t) => self.starts(*t, b),
        }
    }
}

/// Compiles one root schema (a tool's parameters, or an answer's format) into a grammar's tables.
struct Compiler<'a> {
    g: &'a mut Grammar,
    /// The document `$ref`s point into.
    doc: &'a Value,
    /// Refuse what cannot be enforced (an answer's format), rather than leave it free (tools).
    strict: bool,
    /// Compiled `$ref` targets, by reference.
    refs: HashMap<String, SchemaId>,
    /// The first schema this root added.
    first: usize,
}

impl<'a> Compiler<'a> {
    fn new(g: &'a mut Grammar, doc: &'a Value, strict: bool) -> Self {
        let first = g.schemas.len();
        Self {
            g,
            doc,
            strict,
            refs: HashMap::new(),
            first,
        }
    }

    /// Where the grammar cannot follow: an error when strict, otherwise any value.
    fn refuse(&self, path: &str, message: impl Into<String>) -> Result<SchemaId, SchemaError> {
        if self.strict {
            Err(SchemaError {
                path: path.to_string(),
                message: message.into(),
            })
        } else {
            Ok(self.g.any)
        }
    }

    /// Compiles the root, then refuses (or, leniently, frees) cycles that never reach a value and
    /// a root no value satisfies, and prunes what can never complete.
    fn root(mut self, v: &Value, path: &str) -> Result<SchemaId, SchemaError> {
        let id = self.compile(v, 0, path)?;
        self.break_cycles()?;
        let live = self.productive();
        if !live[id as usize] {
            if self.strict {
                return Err(SchemaError {
                    path: path.to_string(),
                    message: "no JSON value satisfies this schema (a required part is unsatisfiable, or a $ref recursion never ends)".into(),
                });
            }
            return Ok(self.g.push(Schema::Map(self.g.any)));
        }
        self.prune(&live);
        Ok(id)
    }

    fn compile(&mut self, v: &Value, depth: usize, path: &str) -> Result<SchemaId, SchemaError> {
        let o = match v {
            Value::Object(o) => o,
            Value::Bool(true) => return Ok(self.g.any),
            Value::Bool(false) => return self.refuse(path, "the schema `false` admits no value"),
            _ => return self.refuse(path, "a schema must be an object or a boolean"),
        };
        if depth > MAX_DEPTH {
            return self.refuse(path, format!("schemas nest deeper than {MAX_DEPTH} levels"));
        }
        if self.strict {
            if let Some(k) = o
                .keys()
                .find(|k| !ANNOTATIONS.contains(&k.as_str()) && !ENFORCED.contains(&k.as_str()))
            {
                return self.refuse(
                    &join(path, k),
                    format!("'{k}' is not enforced by the local engine; remove it, or route the request to a model that enforces it"),
                );
            }
        }
        if let Some(r) = o.get("$ref") {
            if self.strict {
                if let Some(k) = o
                    .keys()
                    .find(|k| *k != "$ref" && !ANNOTATIONS.contains(&k.as_str()))
                {
                    return self.refuse(
                        &join(path, k),
                        format!("'{k}' beside '$ref' is not enforced; move it into the referenced schema"),
                    );
                }
            }
            return self.reference(r, depth, &join(path, "$ref"));
        }
        if let Some(all) = o.get("allOf") {
            let alone = o
                .keys()
                .all(|k| k == "allOf" || ANNOTATIONS.contains(&k.as_str()));
            return match all.as_array() {
                Some(a) if a.len() == 1 && alone => {
                    self.compile(&a[0], depth + 1, &join(path, "allOf.0"))
                }
                _ => self.refuse(
                    &join(path, "allOf"),
                    "'allOf' is enforced only as a single schema with nothing beside it",
                ),
            };
        }
        if let Some(values) = o.get("enum") {
            return match values.as_array() {
                Some(a) if a.is_empty() => {
                    self.refuse(&join(path, "enum"), "an empty 'enum' admits no value")
                }
                Some(a) if a.len() <= MAX_LITERALS => {
                    let l = self.g.lit(a.iter().map(serialized).collect());
                    Ok(self.g.push(Schema::Literals(l)))
                }
                Some(_) => self.refuse(
                    &join(path, "enum"),
                    format!("an 'enum' of more than {MAX_LITERALS} values is not enforced"),
                ),
                None => self.refuse(&join(path, "enum"), "'enum' must be an array"),
            };
        }
        if let Some(c) = o.get("const") {
            let l = self.g.lit(vec![serialized(c)]);
            return Ok(self.g.push(Schema::Literals(l)));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = o.get(key) {
                let Some(alts) = alts.as_array().filter(|a| !a.is_empty()) else {
                    return self.refuse(
                        &join(path, key),
                        format!("'{key}' must be a non-empty array of schemas"),
                    );
                };
                let mut ids = Vec::with_capacity(alts.len());
                for (i, a) in alts.iter().enumerate() {
                    ids.push(self.compile(a, depth + 1, &join(path, &format!("{key}.{i}")))?);
                }
                return Ok(self.g.push(Schema::Union(ids)));
            }
        }
        match o.get("type") {
            Some(Value::String(t)) => self.compile_typed(v, t, depth, path),
            Some(Value::Array(ts)) if !ts.is_empty() => {
                let mut ids = Vec::with_capacity(ts.len());
                for t in ts {
                    let Some(t) = t.as_str() else {
                        return self.refuse(&join(path, "type"), "'type' must name types");
                    };
                    ids.push(self.compile_typed(v, t, depth, path)?);
                }
                Ok(self.g.push(Schema::Union(ids)))
            }
            Some(_) => self.refuse(&join(path, "type"), "'type' must be a type name or a non-empty list of them"),
            None if o.contains_key("properties") => self.compile_typed(v, "object", depth, path),
            None if o.contains_key("items") => self.compile_typed(v, "array", depth, path),
            None => match TYPED_KEYWORDS.iter().find(|k| o.contains_key(**k)) {
                Some(k) => self.refuse(
                    &join(path, k),
                    format!("'{k}' without a 'type' constrains nothing the grammar can follow; add a 'type'"),
                ),
                None => Ok(self.g.any),
            },
        }
    }

    fn reference(&mut self, r: &Value, depth: usize, path: &str) -> Result<SchemaId, SchemaError> {
        let Some(r) = r.as_str() else {
            return self.refuse(path, "'$ref' must be a string");
        };
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let doc = self.doc;
        let target = match r.strip_prefix('#') {
            Some("") => Some(doc),
            Some(pointer) => doc.pointer(pointer),
            None => None,
        };
        let Some(target) = target else {
            return self.refuse(
                path,
                format!("'$ref' '{r}' does not resolve inside the schema (only local '#/...' references are followed)"),
            );
        };
        // Reserved before the target compiles, so a recursive reference finds it.
        let id = self.g.push(Schema::Ref(self.g.any));
        self.refs.insert(r.to_string(), id);
        let at = r
            .trim_start_matches('#')
            .trim_start_matches('/')
            .replace('/', ".");
        let t = self.compile(target, depth + 1, &at)?;
        self.g.schemas[id as usize] = Schema::Ref(t);
        Ok(id)
    }

    fn compile_typed(
        &mut self,
        v: &Value,
        t: &str,
        depth: usize,
        path: &str,
    ) -> Result<SchemaId, SchemaError> {
        let strict = self.strict;
        let count = |k: &str| -> Result<Option<u32>, SchemaError> {
            match v.get(k) {
                None => Ok(None),
                Some(n) => match n.as_u64() {
                    Some(n) => Ok(Some(n.min(u64::from(u32::MAX)) as u32)),
                    None if strict => Err(SchemaError {
                        path: join(path, k),
                        message: format!("'{k}' must be a non-negative integer"),
                    }),
                    None => Ok(None),
                },
            }
        };
        match t {
            "object" => self.object(v, depth, path),
            "array" => {
                let items = match v.get("items") {
                    Some(Value::Array(_)) => {
                        return self.refuse(
                            &join(path, "items"),
                            "tuple 'items' (a list of schemas) is not enforced",
                        )
                    }
                    Some(i) => self.compile(i, depth + 1, &join(path, "items"))?,
                    None => self.g.any,
                };
                let (min, max) = (
                    count("minItems")?.unwrap_or(0),
                    count("maxItems")?.unwrap_or(u32::MAX),
                );
                if min > max {
                    return self.refuse(&join(path, "minItems"), "'minItems' is above 'maxItems'");
                }
                Ok(self.g.push(Schema::Array { items, min, max }))
            }
            "string" => {
                let (min, max) = (
                    count("minLength")?.unwrap_or(0),
                    count("maxLength")?.unwrap_or(u32::MAX),
                );
                if min > max {
                    return self
                        .refuse(&join(path, "minLength"), "'minLength' is above 'maxLength'");
                }
                let pattern = match (v.get("pattern"), v.get("format")) {
                    (Some(_), Some(_)) if self.strict => {
                        return self.refuse(&join(path, "format"), "'format' and 'pattern' together are not enforced; keep one")
                    }
                    (Some(p), _) => match p.as_str().and_then(Pattern::new) {
                        Some(p) => Some(p),
                        None if self.strict => {
                            return self.refuse(&join(path, "pattern"), "this 'pattern' is not enforced (look-around and back-references are not supported, or its automaton is too large)")
                        }
                        None => None,
                    },
                    (None, Some(f)) => match f.as_str().and_then(format_pattern).and_then(Pattern::new) {
                        Some(p) => Some(p),
                        None if self.strict => {
                            return self.refuse(
                                &join(path, "format"),
                                format!("'format' {f} is not enforced (date, time, date-time, uuid, email and ipv4 are)"),
                            )
                        }
                        None => None,
                    },
                    (None, None) => None,
                };
                let pattern = pattern.map(|p| {
                    self.g.patterns.push(p);
                    (self.g.patterns.len() - 1) as u32
                });
                Ok(self.g.push(Schema::String { min, max, pattern }))
            }
            "number" | "integer" => self.number(v, t == "integer", path),
            "boolean" => {
                let l = self.g.lit(vec![b"true".to_vec(), b"false".to_vec()]);
                Ok(self.g.push(Schema::Literals(l)))
            }
            "null" => {
                let l = self.g.lit(vec![b"null".to_vec()]);
                Ok(self.g.push(Schema::Literals(l)))
            }
            other => self.refuse(
                &join(path, "type"),
                format!("'{other}' is not a JSON Schema type"),
            ),
        }
    }

    fn object(&mut self, v: &Value, depth: usize, path: &str) -> Result<SchemaId, SchemaError> {
        let props = match v.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => {
                return self.refuse(&join(path, "properties"), "'properties' must be an object")
            }
        };
        let required: Vec<&str> = match v.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) if r.iter().all(Value::is_string) => {
                r.iter().filter_map(Value::as_str).collect()
            }
            Some(_) if self.strict => {
                return self.refuse(
                    &join(path, "required"),
                    "'required' must be an array of property names",
                )
            }
            Some(_) => Vec::new(),
        };
        let additional = v.get("additionalProperties");
        // Declared properties, then required ones not declared (any value).
        let mut names: Vec<&str> = props
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        for r in &required {
            if !names.contains(r) {
                names.push(r);
            }
        }
        if names.is_empty() {
            return match additional {
                Some(Value::Bool(false)) => {
                    let keys = self.g.lit(Vec::new());
                    Ok(self.g.push(Schema::Object {
                        keys,
                        values: Vec::new(),
                        required: 0,
                        blocked: 0,
                    }))
                }
                Some(a @ Value::Object(_)) => {
                    let values = self.compile(a, depth + 1, &join(path, "additionalProperties"))?;
                    Ok(self.g.push(Schema::Map(values)))
                }
                _ => Ok(self.g.push(Schema::Map(self.g.any))),
            };
        }
        if names.len() > MAX_LITERALS {
            return self.refuse(
                &join(path, "properties"),
                format!("objects of more than {MAX_LITERALS} properties are not enforced"),
            );
        }
        // Objects are closed to the declared properties: a value the schema allows, with no key
        // a model invented.
        let mut values = Vec::with_capacity(names.len());
        for n in &names {
            let id = match props.and_then(|p| p.get(*n)) {
                Some(s) => self.compile(s, depth + 1, &join(path, &format!("properties.{n}")))?,
                None => self.g.any,
            };
            values.push(id);
        }
        let required = required
            .iter()
            .filter_map(|r| names.iter().position(|n| n == r))
            .fold(0u64, |m, i| m | 1 << i);
        let keys = self.g.lit(
            names
                .iter()
                .map(|n| serialized(&Value::String((*n).to_string())))
                .collect(),
        );
        Ok(self.g.push(Schema::Object {
            keys,
            values,
            required,
            blocked: 0,
        }))
    }

    fn number(&mut self, v: &Value, integer: bool, path: &str) -> Result<SchemaId, SchemaError> {
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        // Draft 4 writes exclusive bounds as flags on `minimum`/`maximum`; later drafts as numbers.
        let flag = |k: &str| v.get(k) == Some(&Value::Bool(true));
        let mut lo = (f64::NEG_INFINITY, false);
        let mut hi = (f64::INFINITY, false);
        if let Some(m) = num("minimum") {
            lo = (m, flag("exclusiveMinimum"));
        }
        if let Some(m) = num("exclusiveMinimum") {
            if m >= lo.0 {
                lo = (m, true);
            }
        }
        if let Some(m) = num("maximum") {
            hi = (m, flag("exclusiveMaximum"));
        }
        if let Some(m) = num("exclusiveMaximum") {
            if m <= hi.0 {
                hi = (m, true);
            }
        }
        let unbounded = lo.0 == f64::NEG_INFINITY && hi.0 == f64::INFINITY;
        if integer || unbounded {
            // Bounds rounded inwards to integers.
            let lo_i = if lo.1 {
                lo.0.floor() + 1.0
            } else {
                lo.0.ceil()
            };
            let hi_i = if hi.1 {
                hi.0.ceil() - 1.0
            } else {
                hi.0.floor()
            };
            if lo_i > hi_i {
                return self.refuse(
                    &join(path, "minimum"),
                    "no integer lies between 'minimum' and 'maximum'",
                );
            }
            // `as` saturates: bounds beyond i64 are no bound.
            return Ok(self.g.push(Schema::Number {
                integer,
                lo: lo_i as i64,
                hi: hi_i as i64,
            }));
        }
        let bounds = Bounds {
            lo: lo.0,
            hi: hi.0,
            lo_open: lo.1,
            hi_open: hi.1,
        };
        if !bounds.meets(lo.0.max(-1e300), hi.0.min(1e300), true) {
            return self.refuse(
                &join(path, "minimum"),
                "no number lies between 'minimum' and 'maximum'",
            );
        }
        Ok(self.g.push(Schema::Decimal(bounds)))
    }

    /// Finds `$ref`/`anyOf` cycles that never reach a value (each step of them is a reference or
    /// an alternative, so starting a value would never end): refused, or freed when lenient.
    fn break_cycles(&mut self) -> Result<(), SchemaError> {
        let n = self.g.schemas.len();
        let mut edges: Vec<Vec<SchemaId>> = self
            .g
            .schemas
            .iter()
            .map(|s| match s {
                Schema::Ref(t) => vec![*t],
                Schema::Union(alts) => alts.clone(),
                _ => Vec::new(),
            })
            .collect();
        // 0: unvisited, 1: on the path, 2: done.
        let mut color = vec![0u8; n];
        for start in self.first..n {
            if color[start] != 0 {
                continue;
            }
            let mut stack = vec![(start, 0usize)];
            color[start] = 1;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                let Some(&to) = edges[node].get(*next) else {
                    color[node] = 2;
                    stack.pop();
                    continue;
                };
                *next += 1;
                let to = to as usize;
                match color[to] {
                    0 => {
                        color[to] = 1;
                        stack.push((to, 0));
                    }
                    1 => {
                        if self.strict {
                            return Err(SchemaError {
                                path: "$ref".into(),
                                message: "a '$ref' cycle that never reaches a value (a schema that is only a reference, directly or through anyOf, back to itself)".into(),
                            });
                        }
                        // Leniently, the node that closes the cycle takes any value.
                        self.g.schemas[to] = Schema::Any;
                        edges[to].clear();
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }

    /// Which schemas some finite JSON value satisfies (a least fixpoint).
    fn productive(&self) -> Vec<bool> {
        let s = &self.g.schemas;
        let mut live: Vec<bool> = (0..s.len()).map(|i| i < self.first).collect();
        loop {
            let mut changed = false;
            for i in self.first..s.len() {
                if live[i] {
                    continue;
                }
                let ok = match &s[i] {
                    Schema::Any
                    | Schema::Map(_)
                    | Schema::String { .. }
                    | Schema::Number { .. }
                    | Schema::Decimal(_) => true,
                    Schema::Literals(l) => !self.g.lits[*l as usize].is_empty(),
                    Schema::Object {
                        values, required, ..
                    } => values
                        .iter()
                        .enumerate()
                        .all(|(k, v)| required & (1 << k) == 0 || live[*v as usize]),
                    Schema::Array { items, min, .. } => *min == 0 || live[*items as usize],
                    Schema::Union(alts) => alts.iter().any(|a| live[*a as usize]),
                    Schema::Ref(t) => live[*t as usize],
                };
                if ok {
                    live[i] = true;
                    changed = true;
                }
            }
            if !changed {
                return live;
            }
        }
    }

    /// Drops what can never complete: unsatisfiable alternatives, optional properties and array
    /// items.
    fn prune(&mut self, live: &[bool]) {
        for i in self.first..self.g.schemas.len() {
            match &mut self.g.schemas[i] {
                Schema::Union(alts) => alts.retain(|a| live[*a as usize]),
                Schema::Object {
                    values, blocked, ..
                } => {
                    *blocked = values
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| !live[**v as usize])
                        .fold(0u64, |m, (k, _)| m | 1 << k);
                }
                Schema::Array { items, max, .. } if !live[*items as usize] => *max = 0,
                _ => {}
            }
        }
    }
}
