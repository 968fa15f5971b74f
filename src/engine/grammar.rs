//! Constrained decoding of tool calls. While a local model writes a `<tool_call>` block, only the
//! tokens that keep the block a well-formed call survive sampling: `{"name": <one of the request's
//! tools>, "arguments": <JSON valid against that tool's parameter schema>}`, then
//! `</tool_call>`. Before its first block the model writes freely (it may answer in text, or open a
//! call); with `tool_choice` `required` or a named function the answer must open with a call. After
//! a call only another call (unless `parallel_tool_calls` is false or the choice names a function)
//! or the end of the turn may follow.
//!
//! The grammar is a pushdown automaton over bytes (`CallState`), compiled from the tools' JSON
//! schemas (`ToolGrammar`). A token is allowed when all of its bytes pass the automaton from the
//! current state: the vocabulary is kept as a byte trie (`Vocab`), walked depth-first with the
//! automaton so a whole subtree is dropped at its first bad byte; inside a free string, where almost
//! every token fits, tokens without quote, backslash or control bytes are allowed wholesale.
//!
//! Schema support: `type` (one or a list), `properties` (objects are closed to the declared
//! properties, so a model cannot invent parameters), `required`, `items`, `minItems`/`maxItems`,
//! `minLength`/`maxLength` (in characters), `pattern` (a DFA over the string's decoded text; see
//! `Pattern`), `minimum`/`maximum` and their exclusive forms on integers, `enum`, `const`,
//! `anyOf`/`oneOf` (chosen by the value's first byte). Strings are well-formed UTF-8. Keywords
//! outside that set (`format`, bounds on non-integer numbers, `$ref`, `allOf`), and patterns the
//! regex engine does not take (look-around, back-references), are not enforced: such a value is
//! still valid JSON of the right type (or any JSON where the type is not known). Under a pattern a
//! string takes no `\u` escapes.

use regex_automata::dfa::{dense, Automaton};
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::{Anchored, MatchKind};
use serde_json::Value;

const OPEN: &[u8] = b"<tool_call>";
const CLOSE: &[u8] = b"</tool_call>";
/// Whitespace bytes allowed in a row between JSON tokens: enough for pretty-printed JSON, not
/// enough to let a model spin on blank space.
const MAX_WS: u8 = 16;
/// Nesting of containers allowed (the call's own object included).
const MAX_DEPTH: usize = 24;
/// Bytes in one number: a model cannot write digits forever.
const MAX_NUMBER: u8 = 24;
/// Digits of an integer (what fits an i64) and of an exponent (what fits an f64).
const MAX_INT_DIGITS: u8 = 18;
const MAX_EXP_DIGITS: u8 = 2;
/// Alternatives in one literal set (an enum, the tool names, an object's keys).
const MAX_LITERALS: usize = 64;

type SchemaId = u32;
type LitId = u32;

enum Schema {
    Any,
    /// Closed to its declared keys (`keys`, serialized with quotes), each with its value schema.
    Object {
        keys: LitId,
        values: Vec<SchemaId>,
        required: u64,
    },
    /// Any keys, any values.
    OpenObject,
    Array {
        items: SchemaId,
        min: u32,
        max: u32,
    },
    /// Between `min` and `max` characters (Unicode code points, as JSON Schema counts them),
    /// matching `pattern` (an index into `ToolGrammar::patterns`) if there is one.
    String {
        min: u32,
        max: u32,
        pattern: Option<u32>,
    },
    /// A number; an integer may be bounded to `lo..=hi`.
    Number {
        integer: bool,
        lo: i64,
        hi: i64,
    },
    /// One of these serialized values, byte for byte.
    Literals(LitId),
    /// The first alternative that can start with the value's first byte.
    Union(Vec<SchemaId>),
}

/// The tool calls a request may make, compiled once per request.
pub struct ToolGrammar {
    schemas: Vec<Schema>,
    lits: Vec<Vec<Vec<u8>>>,
    /// The tool names (serialized), and each one's arguments schema.
    names: LitId,
    args: Vec<SchemaId>,
    /// The answer must open with a call (`tool_choice` required or named).
    forced: bool,
    /// More than one call may be made (`parallel_tool_calls`, not a named choice).
    parallel: bool,
    any: SchemaId,
    any_word: LitId,
    name_key: LitId,
    args_key: LitId,
    open: LitId,
    close: LitId,
    /// Compiled `pattern`s: each matches a whole string that contains a match of its pattern.
    patterns: Vec<Pattern>,
}

/// A string schema's `pattern` as a DFA over the string's decoded bytes. A pattern that no string
/// within the schema's length bounds matches can leave a string with no way on; `mask` then
/// leaves the model free rather than pick from nothing, and the parser reports what it wrote.
struct Pattern {
    dfa: dense::DFA<Vec<u32>>,
    start: StateID,
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
    /// or its automaton is too large: it is then not enforced.
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
    fn step(&self, mut at: StateID, bytes: &[u8]) -> Option<StateID> {
        for &b in bytes {
            at = self.dfa.next_state(at, b);
            if self.dfa.is_dead_state(at) || self.dfa.is_quit_state(at) {
                return None;
            }
        }
        Some(at)
    }

    /// Whether a string that ends at `at` matches.
    fn accepts(&self, at: StateID) -> bool {
        self.dfa.is_match_state(self.dfa.next_eoi_state(at))
    }
}

impl ToolGrammar {
    /// The grammar for `tools` (OpenAI function tools) under `tool_choice`, with several calls
    /// in one answer when `parallel` (OpenAI's `parallel_tool_calls`; a named choice makes one
    /// call); `None` when no call can be made (no tools, `none`) or there are more than 64 tools.
    pub fn new(tools: &[Value], tool_choice: Option<&Value>, parallel: bool) -> Option<Self> {
        let named = tool_choice
            .and_then(|c| c.pointer("/function/name"))
            .and_then(Value::as_str);
        let forced = named.is_some() || tool_choice.and_then(Value::as_str) == Some("required");
        if tool_choice.and_then(Value::as_str) == Some("none") {
            return None;
        }
        let mut g = ToolGrammar {
            schemas: Vec::new(),
            lits: Vec::new(),
            names: 0,
            args: Vec::new(),
            forced,
            parallel: parallel && named.is_none(),
            any: 0,
            any_word: 0,
            name_key: 0,
            args_key: 0,
            open: 0,
            close: 0,
            patterns: Vec::new(),
        };
        g.any = g.push(Schema::Any);
        g.any_word = g.lit(vec![b"true".to_vec(), b"false".to_vec(), b"null".to_vec()]);
        g.name_key = g.lit(vec![b"\"name\"".to_vec()]);
        g.args_key = g.lit(vec![b"\"arguments\"".to_vec()]);
        g.open = g.lit(vec![OPEN.to_vec()]);
        g.close = g.lit(vec![CLOSE.to_vec()]);
        let mut names = Vec::new();
        for t in tools {
            let f = t.get("function").unwrap_or(t);
            let Some(name) = f.get("name").and_then(Value::as_str) else {
                continue;
            };
            if named.is_some_and(|n| n != name) {
                continue;
            }
            let params = f.get("parameters").cloned().unwrap_or(Value::Null);
            let schema = match params {
                Value::Object(_) => g.compile(&params, 0),
                _ => g.push(Schema::OpenObject),
            };
            names.push(serialized(&Value::String(name.to_string())));
            g.args.push(schema);
        }
        if names.is_empty() || names.len() > MAX_LITERALS {
            return None;
        }
        g.names = g.lit(names);
        Some(g)
    }

    /// A string frame's pattern and automaton state, with the compiled pattern.
    fn pattern_at(&self, at: Option<(u32, StateID)>) -> Option<(&Pattern, StateID)> {
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

    fn compile(&mut self, v: &Value, depth: usize) -> SchemaId {
        if depth > MAX_DEPTH || !v.is_object() {
            return self.any;
        }
        if let Some(values) = v.get("enum").and_then(Value::as_array) {
            if !values.is_empty() && values.len() <= MAX_LITERALS {
                let l = self.lit(values.iter().map(serialized).collect());
                return self.push(Schema::Literals(l));
            }
        }
        if let Some(c) = v.get("const") {
            let l = self.lit(vec![serialized(c)]);
            return self.push(Schema::Literals(l));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(alts) = v.get(key).and_then(Value::as_array) {
                let ids = alts.iter().map(|a| self.compile(a, depth + 1)).collect();
                return self.push(Schema::Union(ids));
            }
        }
        match v.get("type") {
            Some(Value::String(t)) => self.compile_typed(v, t, depth),
            Some(Value::Array(ts)) => {
                let ids = ts
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|t| self.compile_typed(v, t, depth))
                    .collect();
                self.push(Schema::Union(ids))
            }
            _ if v.get("properties").is_some() => self.compile_typed(v, "object", depth),
            _ if v.get("items").is_some() => self.compile_typed(v, "array", depth),
            _ => self.any,
        }
    }

    fn compile_typed(&mut self, v: &Value, t: &str, depth: usize) -> SchemaId {
        match t {
            "object" => {
                let props = v.get("properties").and_then(Value::as_object);
                let closed = v.get("additionalProperties") == Some(&Value::Bool(false));
                match props {
                    Some(p) if !p.is_empty() && p.len() <= MAX_LITERALS => {
                        let names: Vec<&String> = p.keys().collect();
                        let required = v
                            .get("required")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .filter_map(|r| names.iter().position(|n| *n == r))
                            .fold(0u64, |m, i| m | 1 << i);
                        let keys = self.lit(
                            names
                                .iter()
                                .map(|n| serialized(&Value::String((*n).clone())))
                                .collect(),
                        );
                        let values = p.values().map(|s| self.compile(s, depth + 1)).collect();
                        self.push(Schema::Object {
                            keys,
                            values,
                            required,
                        })
                    }
                    // `{}` only.
                    None if closed => {
                        let keys = self.lit(Vec::new());
                        self.push(Schema::Object {
                            keys,
                            values: Vec::new(),
                            required: 0,
                        })
                    }
                    _ => self.push(Schema::OpenObject),
                }
            }
            "array" => {
                let items = match v.get("items") {
                    Some(i) => self.compile(i, depth + 1),
                    None => self.any,
                };
                let bound = |k: &str| v.get(k).and_then(Value::as_u64).map(|n| n as u32);
                let (min, max) = (
                    bound("minItems").unwrap_or(0),
                    bound("maxItems").unwrap_or(u32::MAX),
                );
                if min > max {
                    return self.any;
                }
                self.push(Schema::Array { items, min, max })
            }
            "string" => {
                let bound = |k: &str| {
                    v.get(k)
                        .and_then(Value::as_u64)
                        .map(|n| n.min(u64::from(u32::MAX)) as u32)
                };
                let (min, max) = (
                    bound("minLength").unwrap_or(0),
                    bound("maxLength").unwrap_or(u32::MAX),
                );
                if min > max {
                    return self.any;
                }
                let pattern = v
                    .get("pattern")
                    .and_then(Value::as_str)
                    .and_then(Pattern::new)
                    .map(|p| {
                        self.patterns.push(p);
                        (self.patterns.len() - 1) as u32
                    });
                self.push(Schema::String { min, max, pattern })
            }
            "number" => self.push(Schema::Number {
                integer: false,
                lo: i64::MIN,
                hi: i64::MAX,
            }),
            "integer" => {
                // Bounds as JSON Schema writes them, rounded inwards to integers. Exclusive ones
                // are numbers from draft 6 on, flags on `minimum`/`maximum` in draft 4.
                let num = |k: &str| v.get(k).and_then(Value::as_f64);
                let flag = |k: &str| v.get(k) == Some(&Value::Bool(true));
                let (min, max) = (num("minimum"), num("maximum"));
                let lo = [
                    min.filter(|_| !flag("exclusiveMinimum")),
                    min.filter(|_| flag("exclusiveMinimum"))
                        .map(|x| x.floor() + 1.0),
                    num("exclusiveMinimum").map(|x| x.floor() + 1.0),
                ]
                .into_iter()
                .flatten()
                .map(f64::ceil)
                .fold(i64::MIN as f64, f64::max);
                let hi = [
                    max.filter(|_| !flag("exclusiveMaximum")),
                    max.filter(|_| flag("exclusiveMaximum"))
                        .map(|x| x.ceil() - 1.0),
                    num("exclusiveMaximum").map(|x| x.ceil() - 1.0),
                ]
                .into_iter()
                .flatten()
                .map(f64::floor)
                .fold(i64::MAX as f64, f64::min);
                if lo > hi {
                    return self.any;
                }
                // `as` saturates: bounds beyond i64 are no bound.
                self.push(Schema::Number {
                    integer: true,
                    lo: lo as i64,
                    hi: hi as i64,
                })
            }
            "boolean" => {
                let l = self.lit(vec![b"true".to_vec(), b"false".to_vec()]);
                self.push(Schema::Literals(l))
            }
            "null" => {
                let l = self.lit(vec![b"null".to_vec()]);
                self.push(Schema::Literals(l))
            }
            _ => self.any,
        }
    }

    /// Whether a value of schema `id` can begin with byte `b`.
    fn starts(&self, id: SchemaId, b: u8) -> bool {
        match &self.schemas[id as usize] {
            Schema::Any => matches!(
                b,
                b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'
            ),
            Schema::Object { .. } | Schema::OpenObject => b == b'{',
            Schema::Array { .. } => b == b'[',
            Schema::String { .. } => b == b'"',
            Schema::Number { .. } => b == b'-' || b.is_ascii_digit(),
            Schema::Literals(l) => self.lits[*l as usize].iter().any(|c| c.first() == Some(&b)),
            Schema::Union(alts) => alts.iter().any(|a| self.starts(*a, b)),
        }
    }
}

fn serialized(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ObjStage {
    /// After `{`: a key, or `}`.
    Open,
    /// A key is being read (child frame).
    Key,
    /// After a key: `:`.
    Colon,
    /// A value is being read (child frame).
    Value,
    /// After a value: `,` or `}`.
    After,
    /// After `,`: a key.
    Comma,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ArrStage {
    Open,
    Value,
    After,
    Comma,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NumStage {
    Start,
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exp,
    ExpSign,
    ExpDigits,
}

#[derive(Clone, Copy, Debug)]
enum Frame {
    /// A value of this schema is expected next.
    Value(SchemaId),
    Obj {
        schema: SchemaId,
        seen: u64,
        key: u8,
        stage: ObjStage,
    },
    AnyObj {
        stage: ObjStage,
    },
    Arr {
        items: SchemaId,
        count: u32,
        min: u32,
        max: u32,
        stage: ArrStage,
    },
    /// Inside a string, after its opening quote. `esc`: 0 plain; 1 after a backslash; 10 + n: n
    /// hex digits of a `\u` escape to go; 20: after a `\u` escape's leading `d`. `close`: bytes
    /// of `</tool_call>` at its end, which it may not contain whole (the block would end there for
    /// whoever parses it). `utf8`: the rest of a multi-byte character, 0 or `utf8_next`'s
    /// state. `len`: characters so far, of `min..=max`. `pattern`: the string's pattern and the
    /// state its automaton is in, fed the string's decoded bytes; `code`: the code point of a
    /// `\u` escape being read.
    Str {
        esc: u8,
        close: u8,
        utf8: u8,
        len: u32,
        min: u32,
        max: u32,
        pattern: Option<(u32, StateID)>,
        code: u32,
    },
    Num {
        stage: NumStage,
        integer: bool,
        len: u8,
        /// Digits in the integer part or the exponent, whichever is being written.
        digits: u8,
        /// An integer's sign and the magnitude of its digits so far.
        neg: bool,
        mag: i64,
        /// Where an integer's bounds are (`Schema::Number`), or `None` for no bounds.
        bounds: Option<SchemaId>,
    },
    /// Matching one of a literal set: `alive` marks the candidates still matching `pos` bytes.
    Lit {
        lit: LitId,
        alive: u64,
        pos: u16,
    },
    /// The call object: `{"name": <name>, "arguments": <args>}`, stage by stage.
    Call {
        stage: u8,
        chosen: u8,
    },
    /// The block around it: (forced) `<tool_call>`, the call, `</tool_call>`.
    Block {
        stage: u8,
    },
}

/// What a frame did with a byte.
enum Act {
    /// Consumed whitespace (counted against `MAX_WS`).
    Space,
    Reject,
    /// The frame is replaced by another; `true`: the new frame takes the byte, `false`: the byte
    /// was consumed.
    Replace(Frame, bool),
    /// A child frame opens; `true`: it takes the byte, `false`: the byte was consumed.
    Push(Frame, bool),
    /// The frame is complete (reporting the literal it matched, if any); `true`: the byte was its
    /// last, `false`: the byte goes to the parent.
    Done(u8, bool),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Free text; `tail` bytes of `<tool_call>` are at its end.
    Free { tail: u8 },
    /// Inside a call block: constrained.
    Call,
    /// After a call: another call, or the end of the turn (no more text).
    Between,
    /// After the one call allowed: the end of the turn.
    Ended,
}

/// One sequence's place in the grammar.
#[derive(Clone, Debug)]
pub struct CallState {
    mode: Mode,
    frames: Vec<Frame>,
    ws: u8,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

fn lit_frame(g: &ToolGrammar, lit: LitId) -> Frame {
    let n = g.lits[lit as usize].len().min(MAX_LITERALS);
    Frame::Lit {
        lit,
        alive: if n == 64 { u64::MAX } else { (1u64 << n) - 1 },
        pos: 0,
    }
}

/// A string's frame after its opening quote.
fn string(g: &ToolGrammar, min: u32, max: u32, pattern: Option<u32>) -> Frame {
    Frame::Str {
        esc: 0,
        close: 0,
        utf8: 0,
        len: 0,
        min,
        max,
        pattern: pattern.and_then(|p| Some((p, g.patterns.get(p as usize)?.start))),
        code: 0,
    }
}

/// UTF-8 inside a string: from state `at` (0: between characters; else 8 × the continuation
/// bytes still due + which range the next one must fall in), the state after byte `b`, or `None`
/// if `b` cannot come next in well-formed UTF-8 (overlong forms, surrogates and code points past
/// U+10FFFF included). ASCII bytes leave the state at 0: the JSON rules for them are the caller's.
fn utf8_next(at: u8, b: u8) -> Option<u8> {
    if at == 0 {
        return match b {
            0x00..=0x7f => Some(0),
            0xc2..=0xdf => Some(8),
            0xe0 => Some(16 + 1),
            0xed => Some(16 + 2),
            0xe1..=0xef => Some(16),
            0xf0 => Some(24 + 3),
            0xf4 => Some(24 + 4),
            0xf1..=0xf3 => Some(24),
            _ => None,
        };
    }
    let range = match at % 8 {
        1 => 0xa0..=0xbf,
        2 => 0x80..=0x9f,
        3 => 0x90..=0xbf,
        4 => 0x80..=0x8f,
        _ => 0x80..=0xbf,
    };
    range.contains(&b).then_some((at / 8 - 1) * 8)
}

/// A number's frame before its first byte.
fn number(integer: bool, bounds: Option<SchemaId>) -> Frame {
    Frame::Num {
        stage: NumStage::Start,
        integer,
        len: 0,
        digits: 0,
        neg: false,
        mag: 0,
        bounds,
    }
}

/// Whether an integer whose digits so far read `mag` (negative if `neg`) can still end inside
/// `lo..=hi`: as it is, or with up to `more` digits appended.
fn integer_can_reach(neg: bool, mag: i64, more: u8, lo: i64, hi: i64) -> bool {
    let (lo, hi) = (i128::from(lo), i128::from(hi));
    let mut scale = 1i128;
    for _ in 0..=more {
        let (a, b) = (i128::from(mag) * scale, i128::from(mag) * scale + scale - 1);
        let (a, b) = if neg { (-b, -a) } else { (a, b) };
        if a <= hi && lo <= b {
            return true;
        }
        scale *= 10;
    }
    false
}

/// The frame a value of schema `id` starting with byte `b` becomes.
fn value_start(g: &ToolGrammar, id: SchemaId, b: u8) -> Act {
    let schema = &g.schemas[id as usize];
    match (schema, b) {
        (Schema::Union(alts), _) => match alts.iter().find(|a| g.starts(**a, b)) {
            Some(a) => Act::Replace(Frame::Value(*a), true),
            None => Act::Reject,
        },
        (Schema::Any | Schema::OpenObject, b'{') => Act::Replace(
            Frame::AnyObj {
                stage: ObjStage::Open,
            },
            false,
        ),
        (Schema::Object { .. }, b'{') => Act::Replace(
            Frame::Obj {
                schema: id,
                seen: 0,
                key: 0,
                stage: ObjStage::Open,
            },
            false,
        ),
        (Schema::Any, b'[') => Act::Replace(
            Frame::Arr {
                items: g.any,
                count: 0,
                min: 0,
                max: u32::MAX,
                stage: ArrStage::Open,
            },
            false,
        ),
        (&Schema::Array { items, min, max }, b'[') => Act::Replace(
            Frame::Arr {
                items,
                count: 0,
                min,
                max,
                stage: ArrStage::Open,
            },
            false,
        ),
        (Schema::Any, b'"') => Act::Replace(string(g, 0, u32::MAX, None), false),
        (&Schema::String { min, max, pattern }, b'"') => {
            Act::Replace(string(g, min, max, pattern), false)
        }
        (Schema::Any, b'-' | b'0'..=b'9') => Act::Replace(number(false, None), true),
        (&Schema::Number { integer, .. }, b'-' | b'0'..=b'9') => {
            Act::Replace(number(integer, integer.then_some(id)), true)
        }
        (Schema::Any, b't' | b'f' | b'n') => Act::Replace(lit_frame(g, g.any_word), true),
        (&Schema::Literals(l), _) => Act::Replace(lit_frame(g, l), true),
        _ => Act::Reject,
    }
}

impl CallState {
    pub fn new(g: &ToolGrammar) -> Self {
        if g.forced {
            CallState {
                mode: Mode::Call,
                frames: vec![Frame::Block { stage: 0 }],
                ws: 0,
            }
        } else {
            Self::free()
        }
    }

    fn free() -> Self {
        CallState {
            mode: Mode::Free { tail: 0 },
            frames: Vec::new(),
            ws: 0,
        }
    }

    /// Constrained: inside a call block (where the turn cannot end), or after one (where only
    /// another call, if several are allowed, or the end of the turn may follow).
    pub fn constrained(&self) -> bool {
        !matches!(self.mode, Mode::Free { .. })
    }

    /// Between calls, before anything of the next: where the turn may end.
    fn may_end(&self) -> bool {
        match self.mode {
            Mode::Between => matches!(self.frames[..], [Frame::Block { stage: 0 }]),
            Mode::Ended => true,
            _ => false,
        }
    }

    /// Takes the bytes of a sampled token. Bytes the grammar refuses (possible only for text
    /// written before the constraint began, such as the rest of the token that opened a block)
    /// end the constraint for this block; the parser then reports what the model wrote.
    pub fn advance(&mut self, g: &ToolGrammar, bytes: &[u8]) {
        for &b in bytes {
            if !self.feed(g, b) {
                *self = Self::free();
            }
        }
    }

    /// Passes one byte through the automaton; `false` if the grammar refuses it (the state is
    /// then unspecified: callers feed clones).
    fn feed(&mut self, g: &ToolGrammar, b: u8) -> bool {
        if let Mode::Free { tail } = self.mode {
            let tail = if OPEN[tail as usize] == b {
                tail + 1
            } else {
                u8::from(b == OPEN[0])
            };
            if tail as usize == OPEN.len() {
                self.mode = Mode::Call;
                self.frames = vec![Frame::Block { stage: 1 }];
                self.ws = 0;
            } else {
                self.mode = Mode::Free { tail };
            }
            return true;
        }
        loop {
            let Some(top) = self.frames.last().copied() else {
                return false;
            };
            match self.step(g, top, b) {
                Act::Space => {
                    self.ws += 1;
                    return self.ws <= MAX_WS;
                }
                Act::Reject => return false,
                Act::Replace(f, takes) => {
                    self.set_top(f);
                    if !takes {
                        self.ws = 0;
                        return true;
                    }
                }
                Act::Push(f, takes) => {
                    if self.frames.len() >= MAX_DEPTH {
                        return false;
                    }
                    self.frames.push(f);
                    if !takes {
                        self.ws = 0;
                        return true;
                    }
                }
                Act::Done(which, last) => {
                    self.frames.pop();
                    self.child_done(which);
                    if self.frames.is_empty() {
                        // The block closed: more calls, or the end of the turn.
                        self.ws = 0;
                        if g.parallel {
                            self.mode = Mode::Between;
                            self.frames.push(Frame::Block { stage: 0 });
                        } else {
                            self.mode = Mode::Ended;
                            return last;
                        }
                        if last {
                            return true;
                        }
                    }
                    if last {
                        self.ws = 0;
                        return true;
                    }
                }
            }
        }
    }

    fn set_top(&mut self, f: Frame) {
        if let Some(t) = self.frames.last_mut() {
            *t = f;
        }
    }

    /// The top frame's child finished (having matched literal `which`, for literal children).
    fn child_done(&mut self, which: u8) {
        let Some(top) = self.frames.last_mut() else {
            return;
        };
        match top {
            Frame::Obj {
                seen, key, stage, ..
            } => {
                if *stage == ObjStage::Key {
                    *seen |= 1 << which;
                    *key = which;
                    *stage = ObjStage::Colon;
                } else {
                    *stage = ObjStage::After;
                }
            }
            Frame::AnyObj { stage } => {
                *stage = if *stage == ObjStage::Key {
                    ObjStage::Colon
                } else {
                    ObjStage::After
                }
            }
            Frame::Arr { count, stage, .. } => {
                *count += 1;
                *stage = ArrStage::After;
            }
            Frame::Call { stage, chosen } => {
                if *stage == 3 {
                    *chosen = which;
                }
                *stage += 1;
            }
            Frame::Block { stage } => {
                *stage += 1;
                if *stage == 3 {
                    self.frames.pop();
                }
            }
            Frame::Value(_) | Frame::Str { .. } | Frame::Num { .. } | Frame::Lit { .. } => {}
        }
    }

    fn step(&mut self, g: &ToolGrammar, top: Frame, b: u8) -> Act {
        let ws = is_ws(b);
        match top {
            Frame::Value(id) => {
                if ws {
                    Act::Space
                } else {
                    value_start(g, id, b)
                }
            }
            Frame::Obj {
                schema,
                seen,
                key,
                stage,
            } => {
                let Schema::Object {
                    keys,
                    values,
                    required,
                } = &g.schemas[schema as usize]
                else {
                    return Act::Reject;
                };
                let n = values.len().min(MAX_LITERALS);
                let all = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                let unseen = all & !seen;
                let with = |stage| Frame::Obj {
                    schema,
                    seen,
                    key,
                    stage,
                };
                match (stage, b) {
                    (ObjStage::Open | ObjStage::After, b'}') if seen & required == *required => {
                        Act::Done(0, true)
                    }
                    (ObjStage::Open | ObjStage::Comma, b'"') if unseen != 0 => {
                        self.set_top(with(ObjStage::Key));
                        Act::Push(
                            Frame::Lit {
                                lit: *keys,
                                alive: unseen,
                                pos: 0,
                            },
                            true,
                        )
                    }
                    (ObjStage::Colon, b':') => {
                        self.set_top(with(ObjStage::Value));
                        let v = values.get(key as usize).copied().unwrap_or(g.any);
                        Act::Push(Frame::Value(v), false)
                    }
                    (ObjStage::After, b',') if unseen != 0 => {
                        Act::Replace(with(ObjStage::Comma), false)
                    }
                    (ObjStage::Key | ObjStage::Value, _) => Act::Reject,
                    _ if ws => Act::Space,
                    _ => Act::Reject,
                }
            }
            Frame::AnyObj { stage } => {
                let with = |stage| Frame::AnyObj { stage };
                match (stage, b) {
                    (ObjStage::Open | ObjStage::After, b'}') => Act::Done(0, true),
                    (ObjStage::Open | ObjStage::Comma, b'"') => {
                        self.set_top(with(ObjStage::Key));
                        Act::Push(string(g, 0, u32::MAX, None), false)
                    }
                    (ObjStage::Colon, b':') => {
                        self.set_top(with(ObjStage::Value));
                        Act::Push(Frame::Value(g.any), false)
                    }
                    (ObjStage::After, b',') => Act::Replace(with(ObjStage::Comma), false),
                    (ObjStage::Key | ObjStage::Value, _) => Act::Reject,
                    _ if ws => Act::Space,
                    _ => Act::Reject,
                }
            }
            Frame::Arr {
                items,
                count,
                min,
                max,
                stage,
            } => {
                let with = |stage| Frame::Arr {
                    items,
                    count,
                    min,
                    max,
                    stage,
                };
                match (stage, b) {
                    (ArrStage::Value, _) => Act::Reject,
                    (ArrStage::Open | ArrStage::After, b']') if count >= min => Act::Done(0, true),
                    (ArrStage::After, b',') if count < max => {
                        Act::Replace(with(ArrStage::Comma), false)
                    }
                    _ if ws => Act::Space,
                    (ArrStage::Open | ArrStage::Comma, _) if count < max => {
                        self.set_top(with(ArrStage::Value));
                        Act::Push(Frame::Value(items), true)
                    }
                    _ => Act::Reject,
                }
            }
            Frame::Str {
                esc,
                close,
                utf8,
                len,
                min,
                max,
                pattern,
                code,
            } => {
                let close = match (esc, CLOSE.get(close as usize)) {
                    (0, Some(&c)) if c == b => close + 1,
                    _ => u8::from(esc == 0 && b == CLOSE[0]),
                };
                if close as usize == CLOSE.len() {
                    return Act::Reject;
                }
                // Only well-formed UTF-8: a model cannot pad a string with stray bytes.
                let Some(utf8) = utf8_next(utf8, b) else {
                    return Act::Reject;
                };
                let compiled = g.pattern_at(pattern);
                // A character starts at an unescaped byte that does not continue a UTF-8
                // sequence; an escape (its backslash) is one character.
                let len = match (esc, b) {
                    (0, b'"') if len < min => return Act::Reject,
                    (0, b'"') => {
                        return match compiled {
                            Some((p, at)) if !p.accepts(at) => Act::Reject,
                            _ => Act::Done(0, true),
                        }
                    }
                    (0, _) if b & 0xC0 != 0x80 => {
                        if len >= max {
                            return Act::Reject;
                        }
                        len + 1
                    }
                    _ => len,
                };
                let hex = (b as char).to_digit(16).unwrap_or(0);
                // The next escape state, the code point so far, and the bytes the string's text
                // gains (an escape's once it is whole).
                let mut text = [0u8; 4];
                let (next, code, gained): (u8, u32, &[u8]) = match (esc, b) {
                    // Under a pattern, an escape opens only if some escape can go on from it:
                    // `\u` is not written there (deciding which of its code points could would
                    // take a search), and the two-byte escapes cover what patterns ask for.
                    (0, b'\\')
                        if compiled.is_some_and(|(p, at)| {
                            !b"\"\\/\x08\x0c\n\r\t"
                                .iter()
                                .any(|&e| p.step(at, &[e]).is_some())
                        }) =>
                    {
                        return Act::Reject
                    }
                    (0, b'\\') => (1, 0, &[]),
                    (0, 0..=0x1f) => return Act::Reject,
                    (0, _) => {
                        text[0] = b;
                        (0, 0, &text[..1])
                    }
                    (1, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                        text[0] = match b {
                            b'b' => 0x08,
                            b'f' => 0x0c,
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            other => other,
                        };
                        (0, 0, &text[..1])
                    }
                    (1, b'u') if compiled.is_some() => return Act::Reject,
                    (1, b'u') => (14, 0, &[]),
                    // No surrogates (D800-DFFF): a lone one is not text, and a pair is better
                    // written as the character itself.
                    (14, b'd' | b'D') => (20, 0xd, &[]),
                    (20, b'0'..=b'7') => (12, code * 16 + hex, &[]),
                    (11, _) if b.is_ascii_hexdigit() => {
                        let c = char::from_u32(code * 16 + hex).unwrap_or('\u{fffd}');
                        (0, 0, c.encode_utf8(&mut text).as_bytes())
                    }
                    (12..=14, _) if b.is_ascii_hexdigit() => (esc - 1, code * 16 + hex, &[]),
                    _ => return Act::Reject,
                };
                let pattern = match (pattern, compiled) {
                    (Some((i, _)), Some((p, at))) => match p.step(at, gained) {
                        Some(at) => Some((i, at)),
                        None => return Act::Reject,
                    },
                    _ => pattern,
                };
                Act::Replace(
                    Frame::Str {
                        esc: next,
                        close,
                        utf8,
                        len,
                        min,
                        max,
                        pattern,
                        code,
                    },
                    false,
                )
            }
            Frame::Num {
                stage,
                integer,
                len,
                digits,
                neg,
                mag,
                bounds,
            } => {
                use NumStage::*;
                let digit = b.is_ascii_digit();
                let full = match stage {
                    Int => digits >= MAX_INT_DIGITS,
                    ExpDigits => digits >= MAX_EXP_DIGITS,
                    _ => false,
                };
                let next = match (stage, b) {
                    _ if len >= MAX_NUMBER || (full && digit) => None,
                    (Start, b'-') => Some(Minus),
                    // `-0` is an integer to JSON Schema, but many parsers read it as a float.
                    (Start, b'0') => Some(Zero),
                    (Minus, b'0') if !integer => Some(Zero),
                    (Start | Minus, b'1'..=b'9') => Some(Int),
                    (Int, _) if digit => Some(Int),
                    (Zero | Int, b'.') if !integer => Some(Dot),
                    (Zero | Int | Frac, b'e' | b'E') if !integer => Some(Exp),
                    (Dot | Frac, _) if digit => Some(Frac),
                    (Exp, b'+' | b'-') => Some(ExpSign),
                    (Exp | ExpSign | ExpDigits, _) if digit => Some(ExpDigits),
                    _ => None,
                };
                let range = match bounds.map(|id| &g.schemas[id as usize]) {
                    Some(&Schema::Number { lo, hi, .. }) => Some((lo, hi)),
                    _ => None,
                };
                match next {
                    Some(next) => {
                        let digits = if next == stage {
                            digits + 1
                        } else {
                            u8::from(digit)
                        };
                        let (neg, mag) = match next {
                            Minus => (true, 0),
                            Zero | Int => (neg, mag * 10 + i64::from(b - b'0')),
                            _ => (neg, mag),
                        };
                        if let Some((lo, hi)) = range {
                            // Only integers are bounded: a sign or digits no integer in range
                            // starts with are refused, so the number can always be finished.
                            let reachable = match next {
                                Minus => lo <= -1 && hi > -(10i64.pow(u32::from(MAX_INT_DIGITS))),
                                Zero => lo <= 0 && 0 <= hi,
                                _ => integer_can_reach(neg, mag, MAX_INT_DIGITS - digits, lo, hi),
                            };
                            if !reachable {
                                return Act::Reject;
                            }
                        }
                        Act::Replace(
                            Frame::Num {
                                stage: next,
                                integer,
                                len: len + 1,
                                digits,
                                neg,
                                mag,
                                bounds,
                            },
                            false,
                        )
                    }
                    None if matches!(stage, Zero | Int | Frac | ExpDigits) => {
                        let value = if neg { -mag } else { mag };
                        match range {
                            Some((lo, hi)) if !(lo..=hi).contains(&value) => Act::Reject,
                            _ => Act::Done(0, false),
                        }
                    }
                    None => Act::Reject,
                }
            }
            Frame::Lit { lit, alive, pos } => {
                let cands = &g.lits[lit as usize];
                let p = pos as usize;
                let (mut next, mut complete, mut longer) = (0u64, 0u64, false);
                for (i, c) in cands.iter().enumerate().take(MAX_LITERALS) {
                    if alive & (1 << i) == 0 {
                        continue;
                    }
                    if c.len() == p {
                        complete |= 1 << i;
                    } else if c[p] == b {
                        next |= 1 << i;
                        longer |= c.len() > p + 1;
                    }
                }
                if next != 0 && !longer {
                    // No survivor can take another byte: complete now.
                    Act::Done(next.trailing_zeros() as u8, true)
                } else if next != 0 {
                    Act::Replace(
                        Frame::Lit {
                            lit,
                            alive: next,
                            pos: pos + 1,
                        },
                        false,
                    )
                } else if complete != 0 {
                    Act::Done(complete.trailing_zeros() as u8, false)
                } else {
                    Act::Reject
                }
            }
            Frame::Call { stage, chosen } => {
                if ws {
                    return Act::Space;
                }
                let with = |stage| Frame::Call { stage, chosen };
                match (stage, b) {
                    (0, b'{') => Act::Replace(with(1), false),
                    (1, _) => Act::Push(lit_frame(g, g.name_key), true),
                    (2, b':') | (6, b':') => Act::Replace(with(stage + 1), false),
                    (3, _) => Act::Push(lit_frame(g, g.names), true),
                    (4, b',') => Act::Replace(with(5), false),
                    (5, _) => Act::Push(lit_frame(g, g.args_key), true),
                    (7, _) => {
                        let args = g.args.get(chosen as usize).copied().unwrap_or(g.any);
                        Act::Push(Frame::Value(args), true)
                    }
                    (8, b'}') => Act::Done(0, true),
                    _ => Act::Reject,
                }
            }
            Frame::Block { stage } => {
                if ws {
                    return Act::Space;
                }
                match stage {
                    0 => Act::Push(lit_frame(g, g.open), true),
                    1 => Act::Push(
                        Frame::Call {
                            stage: 0,
                            chosen: 0,
                        },
                        true,
                    ),
                    2 => Act::Push(lit_frame(g, g.close), true),
                    _ => Act::Reject,
                }
            }
        }
    }
}

/// A tokenizer's vocabulary as bytes, for masking: a trie over the tokens' bytes, and the split
/// of tokens into those that can sit inside any JSON string as they are (no quote, backslash,
/// control byte or `<`) and the rest.
pub struct Vocab {
    bytes: Vec<Box<[u8]>>,
    /// End-of-turn tokens: allowed between calls.
    eos: Vec<u32>,
    nodes: Vec<Node>,
    /// Tokens any string takes whole between characters (whole UTF-8 characters, and no quote,
    /// backslash, control byte or `<`), with how many characters each adds to it.
    plain: Vec<(u32, u32)>,
    other: Vec<u32>,
}

#[derive(Default)]
struct Node {
    children: Vec<(u8, u32)>,
    tokens: Vec<u32>,
}

impl Vocab {
    /// From each token id's bytes (`None`: special tokens, never part of a call) and the
    /// end-of-turn tokens.
    pub fn new(tokens: Vec<Option<Vec<u8>>>, eos: Vec<u32>) -> Self {
        let mut nodes = vec![Node::default()];
        let (mut plain, mut other) = (Vec::new(), Vec::new());
        let mut bytes = Vec::with_capacity(tokens.len());
        for (id, t) in tokens.into_iter().enumerate() {
            let id = id as u32;
            let t = t.unwrap_or_default();
            if !t.is_empty() {
                let mut at = 0usize;
                for &b in &t {
                    at = match nodes[at].children.iter().find(|c| c.0 == b) {
                        Some(&(_, n)) => n as usize,
                        None => {
                            nodes.push(Node::default());
                            let n = nodes.len() - 1;
                            nodes[at].children.push((b, n as u32));
                            n
                        }
                    };
                }
                nodes[at].tokens.push(id);
                if t.iter()
                    .all(|&b| b >= 0x20 && !matches!(b, b'"' | b'\\' | b'<'))
                    && std::str::from_utf8(&t).is_ok()
                {
                    let chars = t.iter().filter(|&&b| b & 0xC0 != 0x80).count() as u32;
                    plain.push((id, chars));
                } else {
                    other.push(id);
                }
            }
            bytes.push(t.into_boxed_slice());
        }
        Vocab {
            bytes,
            eos,
            nodes,
            plain,
            other,
        }
    }

    /// The bytes of a tokenizer's tokens: byte-level BPE vocabularies (GPT-2's byte-to-character
    /// mapping) and SentencePiece ones (`▁` for a space, `<0xNN>` byte tokens). Added and special
    /// tokens have none.
    pub fn from_tokenizer(tok: &tokenizers::Tokenizer, eos: &[u32]) -> Self {
        let size = tok.get_vocab_size(true);
        let added = tok.get_added_tokens_decoder();
        let vocab = tok.get_vocab(false);
        let byte_level = vocab.keys().any(|t| t.contains('\u{120}'));
        let mut of_char = std::collections::HashMap::new();
        for (b, c) in super::tokenizer::byte_chars().into_iter().enumerate() {
            of_char.insert(c, b as u8);
        }
        let tokens = (0..size as u32)
            .map(|id| {
                if added.contains_key(&id) {
                    return None;
                }
                let t = tok.id_to_token(id)?;
                if byte_level {
                    t.chars().map(|c| of_char.get(&c).copied()).collect()
                } else if let Some(hex) = t.strip_prefix("<0x").and_then(|r| r.strip_suffix('>')) {
                    u8::from_str_radix(hex, 16).ok().map(|b| vec![b])
                } else {
                    Some(t.replace('\u{2581}', " ").into_bytes())
                }
            })
            .collect();
        Self::new(tokens, eos.to_vec())
    }

    /// A token's bytes (empty for special tokens and ids outside the vocabulary).
    pub fn bytes(&self, id: u32) -> &[u8] {
        self.bytes.get(id as usize).map_or(&[], |b| b)
    }
}

impl CallState {
    /// Inside a call block, sets the logits of every token the grammar refuses here to -inf
    /// (end-of-turn included: a call cannot stop half-written). Outside, leaves them alone.
    pub fn mask(&self, g: &ToolGrammar, vocab: &Vocab, logits: &mut [f32]) {
        if !self.constrained() {
            return;
        }
        let mut allow = vec![false; logits.len()];
        let mut set = |t: u32| {
            if let Some(a) = allow.get_mut(t as usize) {
                *a = true;
            }
        };
        if let Some(&Frame::Str {
            esc: 0,
            close: 0,
            utf8: 0,
            len,
            max,
            pattern,
            ..
        }) = self.frames.last()
        {
            // Inside a string: every plain token continues it, if it has room for the token's
            // characters and, under a pattern, leaves the string able to match.
            let room = max - len;
            let pattern = g.pattern_at(pattern);
            for &(t, chars) in &vocab.plain {
                if chars <= room
                    && pattern.is_none_or(|(p, at)| p.step(at, vocab.bytes(t)).is_some())
                {
                    set(t);
                }
            }
            for &t in &vocab.other {
                let mut s = self.clone();
                if vocab.bytes(t).iter().all(|&b| s.feed(g, b)) {
                    set(t);
                }
            }
        } else {
            self.walk(g, vocab, 0, &mut set);
        }
        if self.may_end() {
            vocab.eos.iter().for_each(|&t| set(t));
        }
        // The grammar always leaves a way on, so some token fits unless the vocabulary lacks
        // the bytes it needs; then the model is left free rather than made to pick from nothing.
        if !allow.iter().any(|&a| a) {
            return;
        }
        for (l, a) in logits.iter_mut().zip(&allow) {
            if !a {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// Marks every token under trie node `node` whose bytes (from that depth) this state takes.
    fn walk(&self, g: &ToolGrammar, vocab: &Vocab, node: usize, set: &mut impl FnMut(u32)) {
        for &(b, child) in &vocab.nodes[node].children {
            let mut s = self.clone();
            if s.feed(g, b) {
                let child = child as usize;
                vocab.nodes[child].tokens.iter().for_each(|&t| set(t));
                s.walk(g, vocab, child, set);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Vec<Value> {
        vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                    "days": {"type": "integer"},
                    "hourly": {"type": "boolean"},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
                    "coords": {"type": "object", "properties": {
                        "lat": {"type": "number"}, "lon": {"type": "number"}}, "required": ["lat", "lon"]},
                    "note": {"type": ["string", "null"]},
                    "code": {"type": "string", "minLength": 2, "maxLength": 4},
                    "count": {"type": "integer", "minimum": -5, "exclusiveMaximum": 120},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"}
                },
                "required": ["city"]}}}),
            json!({"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}),
        ]
    }

    /// The state after `text`, if the grammar takes all of it.
    fn takes(g: &ToolGrammar, text: &str) -> Option<CallState> {
        let mut s = CallState::new(g);
        text.bytes().all(|b| s.feed(g, b)).then_some(s)
    }

    fn call(name: &str, args: &str) -> String {
        format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {args}}}\n</tool_call>")
    }

    #[test]
    fn whole_calls_valid_against_their_schemas_are_taken_and_close_the_block() {
        let g = ToolGrammar::new(&tools(), Some(&json!("required")), true).unwrap();
        for args in [
            r#"{"city": "Oslo"}"#,
            r#"{"city": "Oslo", "unit": "c", "days": 3, "hourly": false, "note": null}"#,
            r#"{ "coords": {"lat": -59.5, "lon": 1.07e+1}, "city": "a\"b\u00e9\n", "tags": ["x", "y"] }"#,
            r#"{"city": "Zürich", "note": "schön", "days": 0}"#,
            // Lengths in characters: a multi-byte character or an escape is one.
            r#"{"city": "x", "code": "ab"}"#,
            r#"{"city": "x", "code": "é\u00e9\"a"}"#,
            r#"{"city": "x", "code": "日本語"}"#,
            // Integer bounds.
            r#"{"city": "x", "count": -5}"#,
            r#"{"city": "x", "count": 0}"#,
            r#"{"city": "x", "count": 119}"#,
            r#"{"city": "x", "count": 12}"#,
            r#"{"city": "x", "zip": "01234"}"#,
            r#"{"city": "x", "zip": "01234-5678"}"#,
        ] {
            let s = takes(&g, &call("get_weather", args)).unwrap_or_else(|| panic!("{args}"));
            assert!(s.may_end(), "{args}: the block should be closed");
        }
        // No declared properties: any object.
        let s = takes(
            &g,
            &call("get_time", r#"{"tz": ["UTC", {"dst": true}], "n": -1.5}"#),
        );
        assert!(s.is_some_and(|s| s.may_end()));
    }

    #[test]
    fn calls_that_break_the_schema_are_refused() {
        let g = ToolGrammar::new(&tools(), Some(&json!("required")), true).unwrap();
        let bad = [
            call("get_wether", r#"{"city": "Oslo"}"#),
            call("get_weather", r#"{"unit": "c"}"#),
            call("get_weather", r#"{"city": "Oslo", "country": "NO"}"#),
            call("get_weather", r#"{"city": "Oslo", "days": "3"}"#),
            call("get_weather", r#"{"city": "Oslo", "days": 3.5}"#),
            call("get_weather", r#"{"city": "Oslo", "unit": "k"}"#),
            call(
                "get_weather",
                r#"{"city": "Oslo", "tags": ["a", "b", "c", "d"]}"#,
            ),
            call("get_weather", r#"{"city": "Oslo",}"#),
            call("get_weather", "{\"city\": \"line\nbreak\"}"),
            call("get_weather", r#"{"city": "Oslo", "city": "Bergen"}"#),
            call("get_weather", r#"{"city": "Oslo", "coords": {"lat": 1}}"#),
            call("get_weather", r#"{"city": 01}"#),
            call("get_weather", r#"{"city": "\ud83d\ude00"}"#),
            call("get_weather", r#"{"city": "x", "code": "a"}"#),
            call("get_weather", r#"{"city": "x", "code": ""}"#),
            call("get_weather", r#"{"city": "x", "code": "abcde"}"#),
            call("get_weather", r#"{"city": "x", "code": "éééé\n"}"#),
            call("get_weather", r#"{"city": "x", "code": 12}"#),
            call("get_weather", r#"{"city": "x", "count": -6}"#),
            call("get_weather", r#"{"city": "x", "count": -10}"#),
            call("get_weather", r#"{"city": "x", "count": 120}"#),
            call("get_weather", r#"{"city": "x", "count": 1000}"#),
            call("get_weather", r#"{"city": "x", "count": 5.0}"#),
            call("get_weather", r#"{"city": "x", "zip": "0123"}"#),
            call("get_weather", r#"{"city": "x", "zip": "012345"}"#),
            call("get_weather", r#"{"city": "x", "zip": "01234-"}"#),
            call("get_weather", r#"{"city": "x", "zip": "x1234"}"#),
            "<tool_call>{\"arguments\": {}, \"name\": \"get_time\"}</tool_call>".into(),
            "Sure! <tool_call>".into(),
            format!(
                "<tool_call>{{\"name\": \"get_time\", \"arguments\": {{}}}}{}</tool_call>",
                " ".repeat(40)
            ),
        ];
        for text in bad {
            assert!(takes(&g, &text).is_none(), "taken: {text}");
        }
    }

    #[test]
    fn patterns_are_matched_against_the_decoded_string_anywhere_in_it() {
        let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {
                "has": {"type": "string", "pattern": "ab"},
                "line": {"type": "string", "pattern": "^a\n\"b$"},
                "word": {"type": "string", "pattern": "^é+$", "maxLength": 3},
                "old": {"type": "integer", "minimum": 2, "exclusiveMinimum": true,
                    "maximum": 4, "exclusiveMaximum": true},
                "num": {"type": "string", "pattern": "^\\d[\\d-]\\\\d$"},
                "ahead": {"type": "string", "pattern": "^(?=a)"}}}}}]);
        let g = ToolGrammar::new(tool.as_array().unwrap(), Some(&json!("required")), true).unwrap();
        let ok = |args: &str| takes(&g, &call("f", args)).is_some_and(|s| s.may_end());
        for args in [
            r#"{"has": "ab"}"#,
            r#"{"has": "xx ab yy"}"#,
            r#"{"line": "a\n\"b"}"#,
            r#"{"word": "éé"}"#,
            // Draft 4's exclusive flags.
            r#"{"old": 3}"#,
            r#"{"num": "12\\d"}"#,
            r#"{"num": "1-\\d"}"#,
            // Look-ahead is beyond the regex engine: not enforced.
            r#"{"ahead": "zzz"}"#,
        ] {
            assert!(ok(args), "refused {args}");
        }
        for args in [
            r#"{"has": "a b"}"#,
            r#"{"has": "ba"}"#,
            r#"{"line": "a\n\"bb"}"#,
            r#"{"line": "a\\n\"b"}"#,
            r#"{"word": "e"}"#,
            r#"{"word": ""}"#,
            r#"{"word": "éééé"}"#,
            r#"{"old": 2}"#,
            r#"{"old": 4}"#,
            // `\d` is ASCII, as in ECMA-262; `\\d` is a backslash and a `d`.
            r#"{"num": "١2\\d"}"#,
            r#"{"num": "123"}"#,
            // No `\u` escapes under a pattern (the grammar could otherwise start one that no
            // code point finishes).
            r#"{"has": "\u0061b"}"#,
            r#"{"word": "é\u00e9"}"#,
        ] {
            assert!(!ok(args), "taken: {args}");
        }
        // A byte that no matching string can have next is refused at once, not at the end.
        assert!(takes(
            &g,
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"word\": \"é"
        )
        .is_some());
        assert!(takes(
            &g,
            "<tool_call>{\"name\": \"f\", \"arguments\": {\"word\": \"x"
        )
        .is_none());
    }

    #[test]
    fn strings_take_well_formed_utf8_only() {
        let g = ToolGrammar::new(&tools(), Some(&json!("required")), true).unwrap();
        let with = |city: &[u8]| {
            let mut text =
                b"<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"".to_vec();
            text.extend_from_slice(city);
            text.extend_from_slice(b"\"}}</tool_call>");
            let mut s = CallState::new(&g);
            text.iter().all(|&b| s.feed(&g, b)) && s.may_end()
        };
        for ok in [
            "é",
            "日本",
            "😀x",
            "\u{7f}",
            "\u{10ffff}",
            "\u{d7ff}\u{e000}",
        ] {
            assert!(with(ok.as_bytes()), "refused {ok:?}");
        }
        for bad in [
            &b"\xa9"[..],        // a continuation byte on its own
            b"\xc3",             // a character cut short by the quote
            b"\xc3\xc3\xa9",     // a new lead byte where a continuation is due
            b"\xc0\xaf",         // overlong
            b"\xe0\x80\xaf",     // overlong
            b"\xed\xa0\x80",     // a surrogate
            b"\xf4\x90\x80\x80", // past U+10FFFF
            b"\xff",
        ] {
            assert!(!with(bad), "taken: {bad:x?}");
        }
    }

    #[test]
    fn auto_leaves_text_free_and_constrains_each_block_it_opens() {
        let g = ToolGrammar::new(&tools(), None, true).unwrap();
        let s = takes(&g, "Let me check {not json} <tool").unwrap();
        assert!(!s.constrained());
        // A string may not close the block early for whoever parses it.
        let inner = call("get_weather", r#"{"city": "a </tool_call> b"}"#);
        assert!(takes(&g, &inner).is_none());
        let s = takes(
            &g,
            &call("get_weather", r#"{"city": "</tool_cal> <\/tool_call>"}"#),
        );
        assert!(s.is_some_and(|s| s.may_end()));
        let s = takes(&g, "Let me check {not json} <tool").unwrap();
        assert!(!s.constrained());
        let s = takes(&g, "Let me check.\n<tool_call>").unwrap();
        assert!(s.constrained());
        let two = format!(
            "ok {}\n{}",
            call("get_time", "{}"),
            call("get_weather", r#"{"city": "x"}"#)
        );
        assert!(takes(&g, &two).is_some_and(|s| s.may_end()));
        // After a call, no more text.
        assert!(takes(&g, &format!("{} Done!", call("get_time", "{}"))).is_none());
        assert!(takes(&g, &format!("ok {}", call("get_weather", "{}"))).is_none());
        // A named choice allows that function only.
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let g = ToolGrammar::new(&tools(), Some(&named), true).unwrap();
        assert!(takes(&g, &call("get_time", "{}")).is_some());
        assert!(takes(&g, &call("get_weather", r#"{"city": "x"}"#)).is_none());
        assert!(ToolGrammar::new(&tools(), Some(&json!("none")), true).is_none());
        // One call only: after it, nothing but the end of the turn.
        let one = ToolGrammar::new(&tools(), Some(&json!("required")), false).unwrap();
        let s = takes(&one, &call("get_time", "{}")).unwrap();
        assert!(s.may_end() && s.constrained());
        assert!(takes(&one, &format!("{}\n", call("get_time", "{}"))).is_none());
        assert!(takes(
            &one,
            &format!("{}{}", call("get_time", "{}"), call("get_time", "{}"))
        )
        .is_none());
    }

    /// A small vocabulary: every printable ASCII byte, newline, and some multi-byte pieces.
    fn test_vocab() -> Vocab {
        let mut tokens: Vec<Option<Vec<u8>>> = (0x20u8..0x7f).map(|b| Some(vec![b])).collect();
        tokens.push(Some(b"\n".to_vec()));
        for piece in [
            "<tool_call>",
            "</tool_call>",
            "{\"",
            "\":",
            "\", \"",
            "name",
            "arguments",
            "get_",
            "weather",
            "time",
            "city",
            "true",
            "false",
            "null",
            "12",
            "\"}",
            "}}",
            "\\u00",
            "Oslo",
            "\n\n",
            "  ",
            "é",
            "日本",
        ] {
            tokens.push(Some(piece.as_bytes().to_vec()));
        }
        // Pieces of characters, as byte-level vocabularies have them.
        for piece in [&b"\xc3"[..], b"\xa9", b"\xe6\x97", b"\xa5x", b"\xe0"] {
            tokens.push(Some(piece.to_vec()));
        }
        tokens.push(None); // end of turn
        let eos = tokens.len() as u32 - 1;
        Vocab::new(tokens, vec![eos])
    }

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*state >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Checks a generated call against `tools()` by hand.
    fn valid_call(body: &str) -> Result<(), String> {
        let v: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
        let args = v["arguments"]
            .as_object()
            .ok_or("arguments is not an object")?;
        match v["name"].as_str() {
            Some("get_time") => Ok(()),
            Some("get_weather") => {
                let allowed = [
                    "city", "unit", "days", "hourly", "tags", "coords", "note", "code", "count",
                    "zip",
                ];
                if let Some(k) = args.keys().find(|k| !allowed.contains(&k.as_str())) {
                    return Err(format!("undeclared key {k}"));
                }
                let ok = args.get("city").is_some_and(Value::is_string)
                    && args.get("unit").is_none_or(|u| u == "c" || u == "f")
                    && args.get("days").is_none_or(|d| d.is_i64() || d.is_u64())
                    && args.get("hourly").is_none_or(Value::is_boolean)
                    && args.get("tags").is_none_or(|t| {
                        t.as_array()
                            .is_some_and(|a| a.len() <= 3 && a.iter().all(Value::is_string))
                    })
                    && args.get("coords").is_none_or(|c| {
                        c.as_object().is_some_and(|o| {
                            o.len() == 2 && o["lat"].is_number() && o["lon"].is_number()
                        })
                    })
                    && args
                        .get("note")
                        .is_none_or(|n| n.is_string() || n.is_null())
                    && args.get("code").is_none_or(|c| {
                        c.as_str()
                            .is_some_and(|c| (2..=4).contains(&c.chars().count()))
                    })
                    && args
                        .get("count")
                        .is_none_or(|c| c.as_i64().is_some_and(|c| (-5..120).contains(&c)))
                    && args.get("zip").is_none_or(|z| {
                        let zip = regex::Regex::new("^[0-9]{5}(-[0-9]{4})?$").unwrap();
                        z.as_str().is_some_and(|z| zip.is_match(z))
                    });
                ok.then_some(())
                    .ok_or_else(|| format!("schema violated: {args:?}"))
            }
            other => Err(format!("unknown name {other:?}")),
        }
    }

    #[test]
    fn random_models_under_the_mask_always_write_schema_valid_calls() {
        let g = ToolGrammar::new(&tools(), Some(&json!("required")), true).unwrap();
        let vocab = test_vocab();
        let n = vocab.bytes.len();
        let mut rng = 7u64;
        for trial in 0..200 {
            let mut s = CallState::new(&g);
            let mut text = Vec::new();
            let mut steps = 0;
            loop {
                steps += 1;
                assert!(steps < 20_000, "trial {trial}: no end after {steps} tokens");
                let mut logits: Vec<f32> = (0..n).map(|_| lcg(&mut rng)).collect();
                s.mask(&g, &vocab, &mut logits);
                let t = crate::engine::sampling::argmax(&logits);
                assert!(
                    logits[t as usize].is_finite(),
                    "trial {trial}: nothing allowed"
                );
                if vocab.eos.contains(&t) {
                    break;
                }
                text.extend_from_slice(vocab.bytes(t));
                s.advance(&g, vocab.bytes(t));
            }
            let text = String::from_utf8(text).unwrap();
            let blocks: Vec<&str> = text
                .split("</tool_call>")
                .filter(|b| !b.trim().is_empty())
                .collect();
            assert!(!blocks.is_empty(), "trial {trial}: no call");
            for block in blocks {
                let body = block
                    .trim()
                    .strip_prefix("<tool_call>")
                    .unwrap_or_else(|| panic!("trial {trial}: not a block: {text}"));
                if let Err(e) = valid_call(body) {
                    panic!("trial {trial}: {e}: {text}");
                }
            }
        }
    }

    #[test]
    fn the_mask_matches_feeding_each_token_alone() {
        // Whatever the state, a token is allowed exactly when all its bytes pass.
        let g = ToolGrammar::new(&tools(), Some(&json!("required")), true).unwrap();
        let vocab = test_vocab();
        for prefix in [
            "",
            "<tool_call>{\"name\": \"get_",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Os",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"days\": 1",
            // A bounded string: too short to close, then with room for one more character,
            // then full.
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"code\": \"é",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"code\": \"a\\nü",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"code\": \"a\\nüc",
            // A bounded integer: after its sign, after a digit that may go on, and after one
            // that may not.
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"count\": -",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"count\": 1",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"count\": 12",
            // Under a pattern: digits only, then a digit or the end or `-`, then digits.
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"zip\": \"12",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"zip\": \"12345",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"zip\": \"12345-6",
            "<tool_call>{\"name\": \"get_time\", \"arguments\": {}}",
        ]
        .map(|p| p.as_bytes().to_vec())
        .into_iter()
        // Inside a character: only the rest of it may come.
        .chain([
            b"<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"\xe6".to_vec(),
        ]) {
            let mut s = CallState::new(&g);
            assert!(prefix.iter().all(|&b| s.feed(&g, b)));
            let prefix = String::from_utf8_lossy(&prefix);
            let mut logits = vec![0f32; vocab.bytes.len()];
            s.mask(&g, &vocab, &mut logits);
            for (t, l) in logits.iter().enumerate() {
                let bytes = vocab.bytes(t as u32);
                let mut c = s.clone();
                let fits = !bytes.is_empty() && bytes.iter().all(|&b| c.feed(&g, b));
                assert_eq!(
                    l.is_finite(),
                    fits,
                    "after {prefix:?}: token {:?}",
                    String::from_utf8_lossy(bytes)
                );
            }
        }
    }
}
