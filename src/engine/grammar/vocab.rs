//! A tokenizer's vocabulary as bytes, indexed for masking: a byte trie walked with the automaton,
//! and the tokens any JSON string takes whole.

/// A tokenizer's vocabulary as bytes, for masking: a trie over the tokens' bytes, and the split
/// of tokens into those that can sit inside any JSON string as they are (no quote, backslash,
/// control byte or `<`) and the rest.
pub struct Vocab {
    pub(super) bytes: Vec<Box<[u8]>>,
    /// End-of-turn tokens: allowed between calls.
    pub(super) eos: Vec<u32>,
    pub(super) nodes: Vec<Node>,
    /// Tokens any string takes whole between characters (whole UTF-8 characters, and no quote,
    /// backslash, control byte or `<`), with how many characters each adds to it.
    pub(super) plain: Vec<(u32, u32)>,
    pub(super) other: Vec<u32>,
}

#[derive(Default)]
pub(super) struct Node {
    pub(super) children: Vec<(u8, u32)>,
    pub(super) tokens: Vec<u32>,
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
    /// mapping) and SentencePiece ones (`▁` for a space, `<0xNN>` byte tokens). Added tokens are
    /// their text; special tokens have none.
    pub fn from_tokenizer(tok: &tokenizers::Tokenizer, eos: &[u32]) -> Self {
        let size = tok.get_vocab_size(true);
        let added = tok.get_added_tokens_decoder();
        let vocab = tok.get_vocab(false);
        let byte_level = vocab.keys().any(|t| t.contains('\u{120}'));
        let mut of_char = std::collections::HashMap::new();
        for (b, c) in crate::engine::tokenizer::byte_chars()
            .into_iter()
            .enumerate()
        {
            of_char.insert(c, b as u8);
        }
        let tokens = (0..size as u32)
            .map(|id| {
                // Added tokens that are not special are literal text (Qwen's `<tool_call>`).
                if let Some(t) = added.get(&id) {
                    return (!t.special).then(|| t.content.clone().into_bytes());
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
