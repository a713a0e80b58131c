//! [`ModelError`]: the one error type of this crate.
//!
//! Variants are named for the operation that failed and carry the context (file, template line) a user needs to
//! fix the problem; the underlying cause is the `#[source]`, not repeated in the message.

use std::path::PathBuf;

/// Why loading a model, tokenizing, rendering a chat template or detokenizing failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The model directory has no `tokenizer.json`.
    #[error(
        "no tokenizer.json in {dir}; point the model path at a Hugging Face model directory \
         (with tokenizer.json, tokenizer_config.json and config.json)"
    )]
    MissingTokenizer { dir: PathBuf },

    /// A model file exists but could not be read.
    #[error("cannot read {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A JSON model file is malformed.
    #[error("{path} is not valid JSON; re-download the model or fix the file")]
    ParseJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A field of a JSON model file has an unexpected type.
    #[error("{path}: field `{field}` must be {expected}")]
    InvalidField {
        path: PathBuf,
        field: &'static str,
        expected: &'static str,
    },

    /// `tokenizer.json` is valid JSON but not a tokenizer the `tokenizers` crate can load.
    #[error(
        "cannot load the tokenizer from {path}; it must be a Hugging Face fast-tokenizer tokenizer.json"
    )]
    LoadTokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },

    /// `chat_template` is a list of named templates without one called `default`.
    #[error(
        "{path}: chat_template is a list of named templates ({names}) but none is named \"default\"; \
         pass --chat-template with the one to use"
    )]
    NoDefaultChatTemplate { path: PathBuf, names: String },

    /// The chat template does not compile.
    #[error("the chat template from {origin} does not compile (line {}); fix the template or pass --chat-template", display_line(*line))]
    CompileChatTemplate {
        origin: String,
        line: Option<usize>,
        #[source]
        source: minijinja::Error,
    },

    /// The model has no chat template, so `/v1/chat/completions` cannot be served.
    #[error("{origin} has no chat_template; pass --chat-template or use /v1/completions")]
    NoChatTemplate { origin: String },

    /// The chat template called `raise_exception(message)`: the conversation is not one the model accepts
    /// (for example roles that do not alternate). The message is the template's own and is meant for the user.
    #[error("the chat template rejected the conversation: {message}")]
    ChatTemplateRejected { message: String },

    /// Rendering the chat template failed for another reason (a filter on a wrong type, an undefined method...).
    #[error("rendering the chat template failed (line {})", display_line(*line))]
    RenderChatTemplate {
        line: Option<usize>,
        #[source]
        source: minijinja::Error,
    },

    /// Tokenizing text failed.
    #[error("tokenizing the prompt failed")]
    Encode {
        #[source]
        source: tokenizers::Error,
    },

    /// Decoding a list of token ids failed.
    #[error("decoding token ids failed")]
    Decode {
        #[source]
        source: tokenizers::Error,
    },

    /// The streaming detokenizer (non-byte-level tokenizers only) failed on a token.
    #[error("incremental decoding failed at token id {id}")]
    DecodeToken {
        id: u32,
        #[source]
        source: tokenizers::Error,
    },
}

impl ModelError {
    /// Whether the request, not the model or the server, is at fault (an HTTP 400 rather than a 500): the chat
    /// template rejected or could not render the messages, the model has no chat template for a chat request,
    /// or the prompt could not be tokenized.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            ModelError::ChatTemplateRejected { .. }
                | ModelError::RenderChatTemplate { .. }
                | ModelError::NoChatTemplate { .. }
                | ModelError::Encode { .. }
        )
    }
}

/// Renders an optional template line number for messages.
fn display_line(line: Option<usize>) -> String {
    match line {
        Some(line) => line.to_string(),
        None => "unknown".to_owned(),
    }
}
