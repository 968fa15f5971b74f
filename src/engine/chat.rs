//! A model's conversation format: its tokenizer, its chat template and how tools reach the prompt.
//! Serving renders requests through it and training renders examples through it, so a trained
//! adapter sees exactly the prompts it will be served with.

use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use serde_json::Value;

use super::model::ModelError;
use super::template::ChatTemplate;
use super::tokenizer::{self, TokenizerInfo};
use super::tools::{self, ToolFormat};

/// Used when a GGUF file carries no template: ChatML, which SmolLM and Qwen families share.
const CHATML_FALLBACK: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub struct ChatFormat {
    pub tokenizer: Arc<TokenizerInfo>,
    template: ChatTemplate,
    /// Whether the chat template renders `tools` itself (Qwen 2.5, Hermes, ...); otherwise tools
    /// go into a Hermes-style system prompt.
    pub template_tools: bool,
    /// The syntax the model writes tool calls in.
    pub tool_format: ToolFormat,
    /// The generation prompt opens a `<think>` block (Qwen3): answers begin with reasoning.
    pub thinking: bool,
}

/// A training example: the prompt as serving renders it, and the completion the model should
/// produce after it (ending with the end-of-turn token).
pub struct RenderedExample {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl ChatFormat {
    fn new(mut tok: TokenizerInfo, template_src: Option<String>) -> Result<Self, String> {
        let src = template_src.unwrap_or_else(|| CHATML_FALLBACK.to_string());
        let template = ChatTemplate::new(&src, &tok.bos_text, &tok.eos_text)?;
        let template_tools = src.contains("tools");
        let tool_format = match template_tools {
            true => ToolFormat::from_template(&src),
            false => ToolFormat::Hermes,
        };
        tok.keep_in_answers(tool_format.syntax().markers());
        let probe = [serde_json::json!({"role": "user", "content": "hi"})];
        let thinking = template
            .render(&probe, None, true)
            .is_ok_and(|p| p.trim_end().ends_with("<think>"));
        Ok(Self {
            tokenizer: Arc::new(tok),
            template,
            template_tools,
            tool_format,
            thinking,
        })
    }

    /// The stream that splits this model's answers into reasoning, text and (when the request
    /// offers tools) calls.
    pub fn answer_stream(&self, tools: bool) -> tools::ToolCallStream {
        let syntax = tools.then(|| self.tool_format.syntax());
        tools::ToolCallStream::for_answer(syntax, self.thinking)
    }

    /// Reads tool calls in `format` whatever the template suggests (the model's `tool_format`
    /// setting).
    pub fn with_tool_format(mut self, format: ToolFormat) -> Self {
        if let Some(tok) = Arc::get_mut(&mut self.tokenizer) {
            tok.keep_in_answers(format.syntax().markers());
        }
        self.tool_format = format;
        self
    }

    /// One line in the log on how this model gets tools.
    pub fn log_tool_format(&self, model: &str) {
        if self.template_tools {
            tracing::info!(
                model,
                tool_format = self.tool_format.name(),
                "tools are rendered by the model's chat template"
            );
        } else {
            tracing::info!(model, tool_format = self.tool_format.name(), "the model's chat template cannot render tools; they go into a Hermes-style system prompt");
        }
    }

    /// The format stored in a GGUF file's metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, String> {
        let tok = tokenizer::from_gguf(content).map_err(|e| e.to_string())?;
        let template = match content.metadata.get("tokenizer.chat_template") {
            Some(v) => Some(v.to_string().map_err(|e| e.to_string())?.clone()),
            None => None,
        };
        Self::new(tok, template)
    }

    /// The format of a Hugging Face directory (`tokenizer.json`, `tokenizer_config.json`).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, String> {
        let (tok, template) = tokenizer::from_hf_dir(dir).map_err(|e| e.to_string())?;
        Self::new(tok, template)
    }

    /// The format of a model file or directory.
    pub fn load(path: &Path) -> Result<Self, String> {
        if path.is_dir() {
            return Self::from_hf_dir(path);
        }
        let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let content =
            gguf_file::Content::read(&mut f).map_err(|e| ModelError::from(e).to_string())?;
        Self::from_gguf(&content)
    }

    /// The prompt text for a chat request: tools rendered by the template when it knows them, or
    /// as a Hermes-style system prompt (with tool history rewritten) when it does not.
    pub fn prompt(
        &self,
        messages: &[Value],
        tools: &[Value],
        tool_choice: Option<&Value>,
    ) -> Result<String, String> {
        let (messages, tools) = self.prepared(messages, tools, tool_choice);
        self.template.render(&messages, tools.as_ref(), true)
    }

    fn prepared(
        &self,
        messages: &[Value],
        tools: &[Value],
        tool_choice: Option<&Value>,
    ) -> (Vec<Value>, Option<Value>) {
        let choice_none = tool_choice.and_then(Value::as_str) == Some("none");
        let use_tools = !tools.is_empty() && !choice_none;
        let has_tool_history = messages.iter().any(|m| {
            m.get("tool_calls").is_some() || m.get("role").and_then(Value::as_str) == Some("tool")
        });
        let native = use_tools && self.template_tools;
        let mut messages = messages.to_vec();
        if !native && (use_tools || has_tool_history) {
            let prompt = if use_tools {
                tools::tools_system_prompt(tools, tool_choice)
            } else {
                String::new()
            };
            messages = tools::messages_with_tools(&messages, &prompt);
        }
        messages.iter_mut().for_each(arguments_as_objects);
        // A template that renders tools renders their history too, in its family's terms.
        if self.template_tools {
            self.tool_format.syntax().prepare_history(&mut messages);
        }
        (messages, native.then(|| Value::Array(tools.to_vec())))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let enc = self
            .tokenizer
            .tokenizer
            .encode_fast(text, false)
            .map_err(|e| e.to_string())?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, String> {
        self.tokenizer
            .tokenizer
            .decode(ids, true)
            .map_err(|e| e.to_string())
    }

    /// Renders a conversation whose last message is the assistant's answer into the prompt that
    /// serving would build for the messages before it, and the answer's tokens up to and
    /// including the end-of-turn token, exactly as the template writes the assistant turn.
    pub fn training_example(
        &self,
        messages: &[Value],
        tools: &[Value],
        tool_choice: Option<&Value>,
        answer: &Value,
    ) -> Result<RenderedExample, String> {
        let prompt = self.prompt(messages, tools, tool_choice)?;
        let mut all = messages.to_vec();
        all.push(answer.clone());
        let (all, tools_value) = self.prepared(&all, tools, tool_choice);
        let full = self.template.render(&all, tools_value.as_ref(), false)?;
        let Some(rest) = full.strip_prefix(&prompt) else {
            return Err(
                "the chat template renders the assistant turn differently from its generation prompt, so the answer cannot be separated from the prompt".into(),
            );
        };
        let eos = &self.tokenizer.eos_text;
        let answer_text = match (eos.is_empty(), rest.find(eos.as_str())) {
            (false, Some(i)) => &rest[..i + eos.len()],
            _ => rest,
        };
        Ok(RenderedExample {
            prompt: self.encode(&prompt)?,
            completion: self.encode(answer_text)?,
        })
    }
}

/// Tool call arguments arrive as JSON text (OpenAI's wire shape); templates that write calls
/// themselves expect the object (`arguments | tojson`), as Hugging Face's documentation and vLLM
/// hand it to them. Text that is not JSON stays text.
fn arguments_as_objects(message: &mut Value) {
    let Some(calls) = message.get_mut("tool_calls").and_then(Value::as_array_mut) else {
        return;
    };
    for call in calls {
        let Some(args) = call.pointer_mut("/function/arguments") else {
            continue;
        };
        if let Some(parsed) = args
            .as_str()
            .and_then(|a| serde_json::from_str::<Value>(a).ok())
        {
            *args = parsed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::write_tiny_llama;
    use candle_core::quantized::GgmlDType;
    use serde_json::json;

    #[test]
    fn a_tool_call_answer_renders_as_the_model_would_write_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny_llama(&path, GgmlDType::F32, 1);
        let chat = ChatFormat::load(&path).unwrap();
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}),
        ];
        let messages = vec![json!({"role": "user", "content": "weather in Oslo?"})];
        let answer = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1",
            "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]});
        let ex = chat
            .training_example(&messages, &tools, None, &answer)
            .unwrap();
        let prompt = chat.decode(&ex.prompt).unwrap();
        assert_eq!(
            ex.prompt,
            chat.encode(&chat.prompt(&messages, &tools, None).unwrap())
                .unwrap()
        );
        assert!(prompt.contains("get_weather") && prompt.ends_with("assistant\n"));
        let text = chat
            .tokenizer
            .tokenizer
            .decode(&ex.completion, false)
            .unwrap();
        assert_eq!(
            text,
            "<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}\n</tool_call><|im_end|>"
        );
        assert_eq!(ex.completion.last(), chat.tokenizer.eos.first());
    }
}
