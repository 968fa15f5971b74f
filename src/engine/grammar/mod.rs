//! Constrained decoding: what a local model writes is kept, token by token, inside a grammar
//! compiled from the request (`Grammar`, in `schema`).
//!
//! Tool calls: while the model writes a `<tool_call>` block, only the tokens that keep the block
//! a well-formed call survive sampling: `{"name": <one of the request's tools>, "arguments": <JSON
//! valid against that tool's parameter schema>}`, then `</tool_call>`. Before its first block the
//! model writes freely (it may answer in text, or open a call); with `tool_choice` `required` or a
//! named function the answer must open with a call. After a call only another call (unless
//! `parallel_tool_calls` is false or the choice names a function) or the end of the turn may
//! follow.
//!
//! Structured answers (`response_format` `json_object` or `json_schema`): the answer is one JSON
//! value of the format's schema, and the turn cannot end before the value is whole. With tools
//! too, the answer is either calls or that value.
//!
//! The grammar is a pushdown automaton over bytes (`GrammarState`). A token is allowed when all of
//! its bytes pass the automaton from the current state: the vocabulary is kept as a byte trie
//! (`Vocab`), walked depth-first with the automaton so a whole subtree is dropped at its first bad
//! byte; inside a free string, where almost every token fits, tokens without quote, backslash or
//! control bytes are allowed wholesale.
//!
//! Schema support: `type` (one or a list), `properties` (objects are closed to the declared
//! properties, so a model cannot invent keys), `required`, `additionalProperties` (a schema for the
//! values of an object without `properties`), `items`, `minItems`/`maxItems`,
//! `minLength`/`maxLength` (in characters), `pattern` (a DFA over the string's decoded text; see
//! `Pattern`), `format` (date, time, date-time, uuid, email, ipv4, as patterns),
//! `minimum`/`maximum` and their exclusive forms (numbers with bounds are written without an
//! exponent), `enum` and `const` of any JSON values, `anyOf`/`oneOf` (chosen by the value's first
//! byte), a single-schema `allOf`, and local `$ref`s (`$defs`, `definitions`, recursion included).
//! Strings are well-formed UTF-8; under a pattern a string takes no `\u` escapes. What is outside
//! that set is refused for an answer's format and left free for tool arguments (see `schema`).

mod schema;
mod vocab;

use regex_automata::util::primitives::StateID;

pub use schema::{AnswerFormat, CallSyntax, Grammar, SchemaError, ToolSpec};
use schema::{Bounds, LitId, Schema, SchemaId};
pub use vocab::Vocab;

/// The call block's tags, as the prompt teaches them and the parser reads them.
const OPEN: &[u8] = super::tools::OPEN.as_bytes();
const CLOSE: &[u8] = super::tools::CLOSE.as_bytes();
const THINK_END: &[u8] = super::tools::THINK_END.as_bytes();
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
    /// An object of any keys, each value of schema `values`.
    AnyObj { stage: ObjStage, values: SchemaId },
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
        /// Where the number's bounds are (`Schema::Number` for an integer, `Schema::Decimal`),
        /// or `None` for no bounds.
        bounds: Option<SchemaId>,
        /// A bounded decimal's fraction so far, and the place value of its next digit.
        frac: f64,
        place: f64,
    },
    /// Matching one of a literal set: `alive` marks the candidates still matching `pos` bytes.
    Lit { lit: LitId, alive: u64, pos: u16 },
    /// The call object: `{"name": <name>, "arguments": <args>}`, stage by stage.
    Call { stage: u8, chosen: u8 },
    /// The block around it: (forced) `<tool_call>`, the call, `</tool_call>`.
    Block { stage: u8 },
    /// A structured answer: before it (where a tool call's block may open instead), inside it
    /// (`1`), and after it (`2`), where only whitespace and the end of the turn may come.
    Root { stage: u8 },
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
    /// A thinking model's reasoning, free; `matched` bytes of `</think>` are at its end.
    Reasoning { matched: u8 },
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
pub struct GrammarState {
    mode: Mode,
    frames: Vec<Frame>,
    ws: u8,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

fn lit_frame(g: &Grammar, lit: LitId) -> Frame {
    let n = g.lits[lit as usize].len().min(MAX_LITERALS);
    Frame::Lit {
        lit,
        alive: if n == 64 { u64::MAX } else { (1u64 << n) - 1 },
        pos: 0,
    }
}

/// A string's frame after its opening quote.
fn string(g: &Grammar, min: u32, max: u32, pattern: Option<u32>) -> Frame {
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
        frac: 0.0,
        place: 0.1,
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

/// Whether a bounded decimal, now at `stage` with integer part `mag` (`digits` of it written, or
/// of the fraction) and fraction `frac` (the next digit worth `place`), can still end in bounds.
/// Each stage leaves a range of magnitudes reachable; the sign flips the bounds instead.
fn decimal_can_reach(
    d: Bounds,
    stage: NumStage,
    neg: bool,
    mag: i64,
    digits: u8,
    frac: f64,
    place: f64,
) -> bool {
    let d = if neg { d.negated() } else { d };
    let m = mag as f64;
    match stage {
        NumStage::Minus => d.meets(0.0, f64::INFINITY, false),
        NumStage::Zero => d.meets(0.0, 1.0, false),
        // More digits may follow, each multiplying the integer part by ten.
        NumStage::Int => (0..=MAX_INT_DIGITS.saturating_sub(digits)).any(|j| {
            let scale = 10f64.powi(i32::from(j));
            d.meets(m * scale, (m + 1.0) * scale, false)
        }),
        NumStage::Dot => d.meets(m, m + 1.0, false),
        NumStage::Frac => d.meets(m + frac, m + frac + place * 10.0, false),
        _ => false,
    }
}

/// The frame a value of schema `id` starting with byte `b` becomes.
fn value_start(g: &Grammar, id: SchemaId, b: u8) -> Act {
    let schema = &g.schemas[id as usize];
    match (schema, b) {
        (Schema::Union(alts), _) => match alts.iter().find(|a| g.starts(**a, b)) {
            Some(a) => Act::Replace(Frame::Value(*a), true),
            None => Act::Reject,
        },
        (&Schema::Ref(t), _) => Act::Replace(Frame::Value(t), true),
        (Schema::Any, b'{') => Act::Replace(
            Frame::AnyObj {
                stage: ObjStage::Open,
                values: g.any,
            },
            false,
        ),
        (&Schema::Map(values), b'{') => Act::Replace(
            Frame::AnyObj {
                stage: ObjStage::Open,
                values,
            },
            false,
        ),
        (&Schema::Object { blocked, .. }, b'{') => Act::Replace(
            Frame::Obj {
                schema: id,
                seen: blocked,
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
        (Schema::Decimal(_), b'-' | b'0'..=b'9') => Act::Replace(number(false, Some(id)), true),
        (Schema::Any, b't' | b'f' | b'n') => Act::Replace(lit_frame(g, g.any_word), true),
        (&Schema::Literals(l), _) => Act::Replace(lit_frame(g, l), true),
        _ => Act::Reject,
    }
}

impl GrammarState {
    pub fn new(g: &Grammar) -> Self {
        if g.after_reasoning {
            return GrammarState {
                mode: Mode::Reasoning { matched: 0 },
                frames: Vec::new(),
                ws: 0,
            };
        }
        Self::answer(g)
    }

    /// The state at the answer's start.
    fn answer(g: &Grammar) -> Self {
        let first = if g.forced && g.json_calls {
            Frame::Call {
                stage: 0,
                chosen: 0,
            }
        } else if g.forced {
            Frame::Block { stage: 0 }
        } else if g.format.is_some() {
            Frame::Root { stage: 0 }
        } else {
            return Self::free();
        };
        GrammarState {
            mode: Mode::Call,
            frames: vec![first],
            ws: 0,
        }
    }

    fn free() -> Self {
        GrammarState {
            mode: Mode::Free { tail: 0 },
            frames: Vec::new(),
            ws: 0,
        }
    }

    /// Constrained: inside a call block or a structured answer (where the turn cannot end), or
    /// after one (where only another call, if several are allowed, or the end of the turn may
    /// follow).
    pub fn constrained(&self) -> bool {
        !matches!(self.mode, Mode::Free { .. } | Mode::Reasoning { .. })
    }

    /// Between calls, before anything of the next, or after a whole structured answer: where the
    /// turn may end.
    fn may_end(&self, g: &Grammar) -> bool {
        match self.mode {
            Mode::Between => matches!(self.frames[..], [Frame::Block { stage: 0 }]),
            Mode::Ended => true,
            Mode::Call => match self.frames[..] {
                [Frame::Root { stage: 2 }] => true,
                // A number (or a literal that another one extends) ends at the next byte: the
                // value may end here if a space would end it.
                [Frame::Root { stage: 1 }, .., Frame::Num { .. } | Frame::Lit { .. }] => {
                    let mut s = self.clone();
                    s.feed(g, b' ') && matches!(s.frames[..], [Frame::Root { stage: 2 }])
                }
                _ => false,
            },
            _ => false,
        }
    }

    /// Takes the bytes of a sampled token. Bytes the grammar refuses (possible only for text
    /// written before the constraint began, such as the rest of the token that opened a block)
    /// end the constraint for this block; the parser then reports what the model wrote.
    pub fn advance(&mut self, g: &Grammar, bytes: &[u8]) {
        for &b in bytes {
            if !self.feed(g, b) {
                *self = Self::free();
            }
        }
    }

    /// Passes one byte through the automaton; `false` if the grammar refuses it (the state is
    /// then unspecified: callers feed clones).
    fn feed(&mut self, g: &Grammar, b: u8) -> bool {
        if let Mode::Reasoning { matched } = self.mode {
            let matched = match THINK_END.get(matched as usize) {
                Some(&want) if want == b => matched + 1,
                _ => u8::from(b == THINK_END[0]),
            };
            match matched as usize == THINK_END.len() {
                true => *self = Self::answer(g),
                false => self.mode = Mode::Reasoning { matched },
            }
            return true;
        }
        if let (Mode::Free { tail }, true) = (self.mode, g.json_calls) {
            // Llama 3 JSON: `tail` 0 while only whitespace has come; a `{` then opens the call,
            // anything else makes the answer text.
            if tail != 0 || is_ws(b) {
                return true;
            }
            if b != b'{' || !g.has_calls() {
                self.mode = Mode::Free { tail: 1 };
                return true;
            }
            self.mode = Mode::Call;
            self.frames = vec![Frame::Call {
                stage: 0,
                chosen: 0,
            }];
            self.ws = 0;
        } else if let Mode::Free { tail } = self.mode {
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
            Frame::AnyObj { stage, .. } => {
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
            Frame::Root { stage } => *stage = 2,
            Frame::Value(_) | Frame::Str { .. } | Frame::Num { .. } | Frame::Lit { .. } => {}
        }
    }

    fn step(&mut self, g: &Grammar, top: Frame, b: u8) -> Act {
        match top {
            Frame::Value(_) => Self::value_step(g, top, b),
            Frame::Obj { .. } => self.object_step(g, top, b),
            Frame::AnyObj { .. } => self.any_object_step(g, top, b),
            Frame::Arr { .. } => self.array_step(top, b),
            Frame::Str { .. } => self.string_step(g, top, b),
            Frame::Num { .. } => Self::number_step(g, top, b),
            Frame::Lit { .. } => Self::literal_step(g, top, b),
            Frame::Call { .. } => Self::call_step(g, top, b),
            Frame::Block { .. } => Self::block_step(g, top, b),
            Frame::Root { .. } => self.root_step(g, top, b),
        }
    }

    /// A value of a schema is expected: its first byte decides what it becomes.
    fn value_step(g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::Value(id) = top else {
            return Act::Reject;
        };
        let ws = is_ws(b);
        if ws {
            Act::Space
        } else {
            value_start(g, id, b)
        }
    }

    /// Inside an object closed to its declared keys.
    fn object_step(&mut self, g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::Obj {
            schema,
            seen,
            key,
            stage,
        } = top
        else {
            return Act::Reject;
        };
        let ws = is_ws(b);
        let Schema::Object {
            keys,
            values,
            required,
            ..
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
            (ObjStage::After, b',') if unseen != 0 => Act::Replace(with(ObjStage::Comma), false),
            (ObjStage::Key | ObjStage::Value, _) => Act::Reject,
            _ if ws => Act::Space,
            _ => Act::Reject,
        }
    }

    /// Inside an object of any keys.
    fn any_object_step(&mut self, g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::AnyObj { stage, values } = top else {
            return Act::Reject;
        };
        let ws = is_ws(b);
        let with = |stage| Frame::AnyObj { stage, values };
        match (stage, b) {
            (ObjStage::Open | ObjStage::After, b'}') => Act::Done(0, true),
            (ObjStage::Open | ObjStage::Comma, b'"') => {
                self.set_top(with(ObjStage::Key));
                Act::Push(string(g, 0, u32::MAX, None), false)
            }
            (ObjStage::Colon, b':') => {
                self.set_top(with(ObjStage::Value));
                Act::Push(Frame::Value(values), false)
            }
            (ObjStage::After, b',') => Act::Replace(with(ObjStage::Comma), false),
            (ObjStage::Key | ObjStage::Value, _) => Act::Reject,
            _ if ws => Act::Space,
            _ => Act::Reject,
        }
    }

    /// Inside an array.
    fn array_step(&mut self, top: Frame, b: u8) -> Act {
        let Frame::Arr {
            items,
            count,
            min,
            max,
            stage,
        } = top
        else {
            return Act::Reject;
        };
        let ws = is_ws(b);
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
            (ArrStage::After, b',') if count < max => Act::Replace(with(ArrStage::Comma), false),
            _ if ws => Act::Space,
            (ArrStage::Open | ArrStage::Comma, _) if count < max => {
                self.set_top(with(ArrStage::Value));
                Act::Push(Frame::Value(items), true)
            }
            _ => Act::Reject,
        }
    }

    /// Inside a string.
    fn string_step(&mut self, g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::Str {
            esc,
            close,
            utf8,
            len,
            min,
            max,
            pattern,
            code,
        } = top
        else {
            return Act::Reject;
        };
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

    /// Inside a number.
    fn number_step(g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::Num {
            stage,
            integer,
            len,
            digits,
            neg,
            mag,
            bounds,
            frac,
            place,
        } = top
        else {
            return Act::Reject;
        };
        use NumStage::*;
        let digit = b.is_ascii_digit();
        let full = match stage {
            Int => digits >= MAX_INT_DIGITS,
            ExpDigits => digits >= MAX_EXP_DIGITS,
            _ => false,
        };
        let schema = bounds.map(|id| &g.schemas[id as usize]);
        let decimal = match schema {
            Some(&Schema::Decimal(d)) => Some(d),
            _ => None,
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
            (Zero | Int | Frac, b'e' | b'E') if !integer && decimal.is_none() => Some(Exp),
            (Dot | Frac, _) if digit => Some(Frac),
            (Exp, b'+' | b'-') => Some(ExpSign),
            (Exp | ExpSign | ExpDigits, _) if digit => Some(ExpDigits),
            _ => None,
        };
        let range = match schema {
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
                let (frac, place) = match next {
                    Frac => (frac + f64::from(b - b'0') * place, place / 10.0),
                    _ => (frac, place),
                };
                if let Some(d) = decimal {
                    if !decimal_can_reach(d, next, neg, mag, digits, frac, place) {
                        return Act::Reject;
                    }
                }
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
                        frac,
                        place,
                    },
                    false,
                )
            }
            None if matches!(stage, Zero | Int | Frac | ExpDigits) => {
                let value = if neg { -mag } else { mag };
                match (range, decimal) {
                    (Some((lo, hi)), _) if !(lo..=hi).contains(&value) => Act::Reject,
                    (_, Some(d)) => {
                        let d = if neg { d.negated() } else { d };
                        let v = mag as f64 + frac;
                        if d.meets(v, v, true) {
                            Act::Done(0, false)
                        } else {
                            Act::Reject
                        }
                    }
                    _ => Act::Done(0, false),
                }
            }
            None => Act::Reject,
        }
    }

    /// Matching one of a literal set.
    fn literal_step(g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::Lit { lit, alive, pos } = top else {
            return Act::Reject;
        };
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

    /// Inside the call object: `{"name": <name>, "arguments": <args>}`.
    fn call_step(g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::Call { stage, chosen } = top else {
            return Act::Reject;
        };
        let ws = is_ws(b);
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

    /// The block around a call.
    fn block_step(g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::Block { stage } = top else {
            return Act::Reject;
        };
        let ws = is_ws(b);
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

    /// Around a structured answer.
    fn root_step(&mut self, g: &Grammar, top: Frame, b: u8) -> Act {
        let Frame::Root { stage } = top else {
            return Act::Reject;
        };
        let ws = is_ws(b);
        match (stage, g.format) {
            _ if ws => Act::Space,
            (0, _) if b == b'<' && g.has_calls() => Act::Replace(Frame::Block { stage: 0 }, true),
            (0, Some(format)) => {
                self.set_top(Frame::Root { stage: 1 });
                Act::Push(Frame::Value(format), true)
            }
            _ => Act::Reject,
        }
    }
}

impl GrammarState {
    /// Where the output is constrained, sets the logits of every token the grammar refuses here
    /// to -inf (end-of-turn included: a call or a structured answer cannot stop half-written).
    /// Outside (free text before a call), leaves them alone.
    pub fn mask(&self, g: &Grammar, vocab: &Vocab, logits: &mut [f32]) {
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
        if self.may_end(g) {
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
    fn walk(&self, g: &Grammar, vocab: &Vocab, node: usize, set: &mut impl FnMut(u32)) {
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
    use serde_json::Value;

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
    fn takes(g: &Grammar, text: &str) -> Option<GrammarState> {
        let mut s = GrammarState::new(g);
        text.bytes().all(|b| s.feed(g, b)).then_some(s)
    }

    fn call(name: &str, args: &str) -> String {
        format!("<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {args}}}\n</tool_call>")
    }

    #[test]
    fn whole_calls_valid_against_their_schemas_are_taken_and_close_the_block() {
        let g = Grammar::for_tools(&tools(), Some(&json!("required")), true).unwrap();
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
            assert!(s.may_end(&g), "{args}: the block should be closed");
        }
        // No declared properties: any object.
        let s = takes(
            &g,
            &call("get_time", r#"{"tz": ["UTC", {"dst": true}], "n": -1.5}"#),
        );
        assert!(s.is_some_and(|s| s.may_end(&g)));
    }

    #[test]
    fn llama_json_calls_open_only_at_the_answers_start_and_take_parameters() {
        let t = tools();
        let spec = |choice| ToolSpec {
            tools: &t,
            choice,
            parallel: true,
            syntax: CallSyntax::Json,
        };
        let required = json!("required");
        let g = Grammar::new(Some(spec(Some(&required))), None)
            .unwrap()
            .unwrap();
        let call = r#"{"name": "get_weather", "parameters": {"city": "Oslo", "days": 2}}"#;
        assert!(takes(&g, call).is_some_and(|s| s.may_end(&g)));
        for bad in [
            r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#,
            r#"{"name": "get_wether""#,
            r#"{"name": "get_weather", "parameters": {"days": 2}}"#,
            "Sure, ",
            "<tool_call>",
        ] {
            assert!(takes(&g, bad).is_none(), "{bad}");
        }
        // One call, then only the end of the turn.
        assert!(takes(&g, &format!("{call};")).is_none());
        // After a thinking model's reasoning, which is free.
        let thinking = Grammar::new(Some(spec(Some(&required))), None)
            .unwrap()
            .unwrap()
            .after_reasoning();
        let s = takes(&thinking, "Oslo, so </thin").unwrap();
        assert!(!s.constrained());
        let s = takes(&thinking, &format!("Oslo </think>\n\n{call}")).unwrap();
        assert!(s.may_end(&thinking));
        assert!(takes(&thinking, "</think>\n\nSure").is_none());
        // Unforced: the answer is text unless its first character opens a call.
        let g = Grammar::new(Some(spec(None)), None).unwrap().unwrap();
        assert!(takes(&g, " \n").is_some_and(|s| !s.constrained()));
        assert!(takes(&g, " {\"name\": \"get_").is_some_and(|s| s.constrained()));
        assert!(takes(&g, " {\"name\": \"nope").is_none());
        assert!(takes(&g, "It is {\"name\": \"nope").is_some_and(|s| !s.constrained()));
    }

    #[test]
    fn calls_that_break_the_schema_are_refused() {
        let g = Grammar::for_tools(&tools(), Some(&json!("required")), true).unwrap();
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
        let g =
            Grammar::for_tools(tool.as_array().unwrap(), Some(&json!("required")), true).unwrap();
        let ok = |args: &str| takes(&g, &call("f", args)).is_some_and(|s| s.may_end(&g));
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
        let g = Grammar::for_tools(&tools(), Some(&json!("required")), true).unwrap();
        let with = |city: &[u8]| {
            let mut text =
                b"<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"".to_vec();
            text.extend_from_slice(city);
            text.extend_from_slice(b"\"}}</tool_call>");
            let mut s = GrammarState::new(&g);
            text.iter().all(|&b| s.feed(&g, b)) && s.may_end(&g)
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
        let g = Grammar::for_tools(&tools(), None, true).unwrap();
        let s = takes(&g, "Let me check {not json} <tool").unwrap();
        assert!(!s.constrained());
        // A string may not close the block early for whoever parses it.
        let inner = call("get_weather", r#"{"city": "a </tool_call> b"}"#);
        assert!(takes(&g, &inner).is_none());
        let s = takes(
            &g,
            &call("get_weather", r#"{"city": "</tool_cal> <\/tool_call>"}"#),
        );
        assert!(s.is_some_and(|s| s.may_end(&g)));
        let s = takes(&g, "Let me check {not json} <tool").unwrap();
        assert!(!s.constrained());
        let s = takes(&g, "Let me check.\n<tool_call>").unwrap();
        assert!(s.constrained());
        let two = format!(
            "ok {}\n{}",
            call("get_time", "{}"),
            call("get_weather", r#"{"city": "x"}"#)
        );
        assert!(takes(&g, &two).is_some_and(|s| s.may_end(&g)));
        // After a call, no more text.
        assert!(takes(&g, &format!("{} Done!", call("get_time", "{}"))).is_none());
        assert!(takes(&g, &format!("ok {}", call("get_weather", "{}"))).is_none());
        // A named choice allows that function only.
        let named = json!({"type": "function", "function": {"name": "get_time"}});
        let g = Grammar::for_tools(&tools(), Some(&named), true).unwrap();
        assert!(takes(&g, &call("get_time", "{}")).is_some());
        assert!(takes(&g, &call("get_weather", r#"{"city": "x"}"#)).is_none());
        assert!(Grammar::for_tools(&tools(), Some(&json!("none")), true).is_none());
        // One call only: after it, nothing but the end of the turn.
        let one = Grammar::for_tools(&tools(), Some(&json!("required")), false).unwrap();
        let s = takes(&one, &call("get_time", "{}")).unwrap();
        assert!(s.may_end(&g) && s.constrained());
        assert!(takes(&one, &format!("{}\n", call("get_time", "{}"))).is_none());
        assert!(takes(
            &one,
            &format!("{}{}", call("get_time", "{}"), call("get_time", "{}"))
        )
        .is_none());
    }

    /// A small vocabulary: every printable ASCII byte, newline, and some multi-byte pieces.
    pub(super) fn test_vocab() -> Vocab {
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

    /// What a model with random logits writes under the mask, up to the end of its turn.
    pub(super) fn random_walk(g: &Grammar, vocab: &Vocab, rng: &mut u64) -> String {
        let mut s = GrammarState::new(g);
        let mut text = Vec::new();
        for _ in 0..20_000 {
            let mut logits: Vec<f32> = (0..vocab.bytes.len()).map(|_| lcg(rng)).collect();
            s.mask(g, vocab, &mut logits);
            let t = crate::engine::sampling::argmax(&logits);
            assert!(
                logits[t as usize].is_finite(),
                "nothing allowed after {text:?}"
            );
            if vocab.eos.contains(&t) {
                return String::from_utf8(text).unwrap();
            }
            text.extend_from_slice(vocab.bytes(t));
            s.advance(g, vocab.bytes(t));
        }
        panic!("no end after 20,000 tokens");
    }

    pub(super) fn lcg(state: &mut u64) -> f32 {
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
        let g = Grammar::for_tools(&tools(), Some(&json!("required")), true).unwrap();
        let vocab = test_vocab();
        let mut rng = 7u64;
        for trial in 0..200 {
            let text = random_walk(&g, &vocab, &mut rng);
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
        let g = Grammar::for_tools(&tools(), Some(&json!("required")), true).unwrap();
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
            let mut s = GrammarState::new(&g);
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

#[cfg(test)]
mod answer_tests;
