//! Builds a `tokenizers` tokenizer from a GGUF file's own vocabulary: byte-level BPE (`gpt2`
//! models) from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`, with control tokens added as
//! special tokens so chat markers like `<|im_start|>` are never split.

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use super::model::ModelError;

/// Tokens that end a model's turn besides its eos token (Llama 3 ends a turn that calls a tool
/// with `<|eom_id|>`).
const END_OF_TURN: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<end_of_turn>",
];

/// A tokenizer plus the ids the engine needs.
pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    /// Special tokens dropped from answers; `None` drops every special token. Tool-call markers
    /// that are special tokens (`[TOOL_CALLS]`) stay in the answer so the calls can be read.
    hidden: Option<std::collections::HashSet<u32>>,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
    pub bos_text: String,
    pub eos_text: String,
}

fn strings(v: &gguf_file::Value) -> Result<Vec<String>, ModelError> {
    v.to_vec()?
        .iter()
        .map(|s| s.to_string().cloned().map_err(ModelError::from))
        .collect()
}

pub fn from_gguf(content: &gguf_file::Content) -> Result<TokenizerInfo, ModelError> {
    let get = |k: &str| content.metadata.get(k);
    let model = get("tokenizer.ggml.model")
        .map(|v| v.to_string().cloned())
        .transpose()?
        .unwrap_or_default();
    if model != "gpt2" {
        return Err(ModelError::Unsupported(format!(
            "GGUF tokenizer model '{model}' (supported: gpt2 byte-level BPE); load the model from a Hugging Face directory with tokenizer.json instead"
        )));
    }
    let tokens = strings(
        get("tokenizer.ggml.tokens")
            .ok_or_else(|| ModelError::Missing("tokenizer.ggml.tokens".into()))?,
    )?;
    let merges = strings(
        get("tokenizer.ggml.merges")
            .ok_or_else(|| ModelError::Missing("tokenizer.ggml.merges".into()))?,
    )?;
    let types: Vec<i32> = match get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|t| t.to_i32())
            .collect::<Result<_, _>>()?,
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .filter_map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| ModelError::Unsupported(format!("cannot build the BPE tokenizer: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let pre_name = get("tokenizer.ggml.pre")
        .map(|v| v.to_string().cloned())
        .transpose()?;
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer(pre_name.as_deref())?));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    // Type 3 is "control" in GGUF's token types: special, dropped when decoding for the client.
    // Type 4 is "user defined" (Qwen's `<tool_call>`): atomic like a special token, but text the
    // client sees and the tool-call parser reads.
    let of_type = |want: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, t)| **t == want)
            .map(|(s, _)| AddedToken::from(s.clone(), special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(&of_type(3, true));
    tokenizer.add_tokens(&of_type(4, false));
    let id = |k: &str| -> Result<Option<u32>, ModelError> {
        Ok(get(k).map(|v| v.to_u32()).transpose()?)
    };
    let bos = id("tokenizer.ggml.bos_token_id")?;
    let eos_id = id("tokenizer.ggml.eos_token_id")?;
    let text = |i: Option<u32>| {
        i.and_then(|i| tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };
    let mut eos: Vec<u32> = eos_id.into_iter().collect();
    // Chat models end turns with their end-of-turn marker even when eos names another token.
    for marker in END_OF_TURN {
        if let Some(i) = tokens.iter().position(|t| t == marker) {
            if !eos.contains(&(i as u32)) {
                eos.push(i as u32);
            }
        }
    }
    Ok(TokenizerInfo {
        hidden: None,
        tokenizer,
        bos,
        bos_text: text(bos),
        eos_text: text(eos_id),
        eos,
    })
}

impl TokenizerInfo {
    /// Keeps these special tokens' text in decoded answers.
    pub fn keep_in_answers(&mut self, markers: &[&str]) {
        let keep: Vec<u32> = markers
            .iter()
            .filter_map(|m| self.tokenizer.token_to_id(m))
            .collect();
        if keep.is_empty() {
            self.hidden = None;
            return;
        }
        let hidden = self
            .tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(id, t)| t.special && !keep.contains(id))
            .map(|(id, _)| id)
            .collect();
        self.hidden = Some(hidden);
    }

    /// The text of generated tokens as the client sees it.
    pub fn decode_answer(&self, ids: &[u32]) -> tokenizers::Result<String> {
        match &self.hidden {
            None => self.tokenizer.decode(ids, true),
            Some(hidden) => {
                let shown: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|i| !hidden.contains(i))
                    .collect();
                self.tokenizer.decode(&shown, false)
            }
        }
    }
}

/// How the text is split before BPE, by the name llama.cpp's converter writes into
/// `tokenizer.ggml.pre`: the same splits as each family's own `tokenizer.json`.
fn pre_tokenizer(name: Option<&str>) -> Result<PreTokenizerWrapper, ModelError> {
    // Llama 3's split; Qwen2's differs only in taking digits one at a time.
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let split = match name {
        // GPT-2's own split (inside ByteLevel), digits one at a time: SmolLM's.
        None | Some("default" | "gpt2" | "smollm") => {
            let parts: Vec<PreTokenizerWrapper> = vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ];
            return Ok(Sequence::new(parts).into());
        }
        Some("llama-bpe" | "llama3" | "smaug-bpe") => LLAMA3,
        Some("qwen2" | "deepseek-r1-qwen") => QWEN2,
        Some("tekken") => TEKKEN,
        Some(other) => {
            return Err(ModelError::Unsupported(format!(
                "GGUF pre-tokenizer '{other}' (supported: default, gpt2, smollm, llama-bpe, qwen2, tekken); load the model from a Hugging Face directory with tokenizer.json instead"
            )))
        }
    };
    let split = Split::new(
        SplitPattern::Regex(split.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| ModelError::Unsupported(format!("pre-tokenizer pattern: {e}")))?;
    let parts: Vec<PreTokenizerWrapper> =
        vec![split.into(), ByteLevel::new(false, true, false).into()];
    Ok(Sequence::new(parts).into())
}

/// GPT-2's reversible byte → printable character mapping, as byte-level BPE vocabularies use it.
pub fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![' '; 256];
    for (b, c) in printable.iter().zip(chars) {
        out[*b as usize] = char::from_u32(c).unwrap_or('?');
    }
    out
}

/// The tokenizer and chat template of a Hugging Face model directory (`tokenizer.json`,
/// `tokenizer_config.json`). Returns the tokenizer and the template source, if any.
pub fn from_hf_dir(dir: &std::path::Path) -> Result<(TokenizerInfo, Option<String>), ModelError> {
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
        ModelError::Unsupported(format!("{}: {e}", dir.join("tokenizer.json").display()))
    })?;
    let cfg: serde_json::Value = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
        Ok(t) => serde_json::from_str(&t).map_err(|e| {
            ModelError::Unsupported(format!("tokenizer_config.json is not JSON: {e}"))
        })?,
        Err(_) => serde_json::Value::Null,
    };
    // Special tokens appear either as strings or as {"content": ...} objects.
    let token_text = |k: &str| match &cfg[k] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    };
    let template = match &cfg["chat_template"] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => list
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    };
    let bos_text = token_text("bos_token").unwrap_or_default();
    let eos_text = token_text("eos_token").unwrap_or_default();
    let bos = tokenizer.token_to_id(&bos_text);
    let mut eos: Vec<u32> = tokenizer.token_to_id(&eos_text).into_iter().collect();
    for marker in END_OF_TURN {
        if let Some(i) = tokenizer.token_to_id(marker) {
            if !eos.contains(&i) {
                eos.push(i);
            }
        }
    }
    Ok((
        TokenizerInfo {
            tokenizer,
            hidden: None,
            bos,
            eos,
            bos_text,
            eos_text,
        },
        template,
    ))
}
