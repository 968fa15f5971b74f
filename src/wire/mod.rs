//! The shapes on the wire, at the bottom of the request path. Each front door (chat completions,
//! the Responses API, Anthropic's Messages API, legacy completions, embeddings) parses its body here
//! once into a typed view, translates it into the one internal exchange the gateway pipeline speaks
//! (a chat-completions request; completions and embeddings keep their own bodies), and translates
//! the pipeline's answer back, whole or as a stream of events. Each API's error envelope and stream
//! framing live here too. Nothing here knows about routes, backends or the store.

pub mod answer;
pub mod chat;
pub mod completions;
pub mod error;
pub mod messages;
pub mod native;
pub mod responses;
pub mod sse;
pub mod tool_calls;

/// Which front door an exchange came through. The pipeline treats the three chat-shaped doors alike
/// (their requests are translated into chat completions); completions and embeddings keep their
/// own shapes all the way to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Responses,
    Messages,
    Completions,
    Embeddings,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::Chat => "chat",
            Api::Responses => "responses",
            Api::Messages => "messages",
            Api::Completions => "completions",
            Api::Embeddings => "embeddings",
        }
    }

    /// Whether the internal exchange is a chat completion (request and response).
    pub fn is_chat_shaped(self) -> bool {
        matches!(self, Api::Chat | Api::Responses | Api::Messages)
    }

    /// The path an upstream serves a body of this shape at (under its base URL, e.g. `/v1`).
    pub fn upstream_path(self) -> &'static str {
        match self {
            Api::Chat => "/chat/completions",
            Api::Responses => "/responses",
            Api::Messages => "/messages",
            Api::Completions => "/completions",
            Api::Embeddings => "/embeddings",
        }
    }

    /// The key holding an answer's output in this API's non-streamed body.
    pub fn answer_key(self) -> &'static str {
        match self {
            Api::Chat | Api::Completions => "choices",
            Api::Responses => "output",
            Api::Messages => "content",
            Api::Embeddings => "data",
        }
    }

    /// Every API, in a fixed order (the upstream client keeps one URL per API).
    pub const ALL: [Api; 5] = [
        Api::Chat,
        Api::Responses,
        Api::Messages,
        Api::Completions,
        Api::Embeddings,
    ];

    /// The API a config names (`responses`, `messages`, ...).
    pub fn parse(name: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|a| a.as_str() == name)
    }
}
