//! OpenAI request and response shapes for `/v1/chat/completions`, `/v1/completions` and `/v1/models`,
//! and the validation that turns a request into generation parameters.
//!
//! Unknown request fields are accepted and ignored (clients send vendor extensions through
//! `extra_body`); fields we cannot honour (`n` > 1, `logprobs`, `echo`, `suffix`, `best_of` > 1)
//! are refused with a 400 that says so, rather than silently ignored.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::ApiError;

/// `stop`: one string or up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// NVIDIA Dynamo's request extension object; only the fields we honour are read.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NvExt {
    pub ignore_eos: Option<bool>,
}

/// Sampling and length fields shared by both endpoints.
#[derive(Debug, Clone, Default)]
pub struct CommonParams {
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<u32>,
    pub stop: Option<Stop>,
    pub ignore_eos: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub nvext: Option<NvExt>,
}

/// Declares a request struct with the [`CommonParams`] fields inline (not `#[serde(flatten)]`,
/// which would lose the field path in type errors: "invalid type for max_tokens" must name it).
macro_rules! request_with_common_params {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            #[serde(default)]
            pub stream: bool,
            pub stream_options: Option<StreamOptions>,
            pub max_tokens: Option<u32>,
            pub stop: Option<Stop>,
            pub ignore_eos: Option<bool>,
            pub temperature: Option<f32>,
            pub top_p: Option<f32>,
            pub seed: Option<i64>,
            pub n: Option<u32>,
            pub presence_penalty: Option<f32>,
            pub frequency_penalty: Option<f32>,
            pub nvext: Option<NvExt>,
        }

        impl $name {
            pub fn common(&self) -> CommonParams {
                CommonParams {
                    stream: self.stream,
                    stream_options: self.stream_options.clone(),
                    max_tokens: self.max_tokens,
                    stop: self.stop.clone(),
                    ignore_eos: self.ignore_eos,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    seed: self.seed,
                    n: self.n,
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    nvext: self.nvext.clone(),
                }
            }
        }
    };
}

request_with_common_params! {
    #[derive(Debug, Clone, Deserialize)]
    pub struct ChatCompletionRequest {
        pub model: String,
        pub messages: Vec<ChatMessage>,
        pub max_completion_tokens: Option<u32>,
        pub logprobs: Option<bool>,
        pub tools: Option<Value>,
        pub tool_choice: Option<Value>,
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Any other field (`name`, `tool_calls`, `tool_call_id`, ...) is passed to the chat template.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

request_with_common_params! {
    #[derive(Debug, Clone, Deserialize)]
    pub struct CompletionRequest {
        pub model: String,
        pub prompt: Prompt,
        pub echo: Option<bool>,
        pub suffix: Option<String>,
        pub best_of: Option<u32>,
        pub logprobs: Option<u32>,
    }
}

/// `prompt`: text, token ids, or a batch of either (only a batch of one is supported).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    TextBatch(Vec<String>),
    TokenBatch(Vec<Vec<u32>>),
}

/// What the engine is asked to do, after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
}

impl CommonParams {
    /// Checks ranges and unsupported options; `max_tokens` is the effective limit (for chat,
    /// `max_completion_tokens` wins over the deprecated `max_tokens`).
    pub fn validate(&self, max_tokens: Option<u32>) -> Result<GenParams, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid(
                format!(
                    "n = {n} is not supported: this server returns exactly one choice per request; send n = 1 (or omit it) and issue parallel requests instead"
                ),
                "n",
            ));
        }
        if max_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_tokens must be at least 1",
                "max_tokens",
            ));
        }
        if let Some(t) = self.temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(ApiError::invalid(
                format!("temperature must be between 0 and 2 (got {t})"),
                "temperature",
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::invalid(
                format!("top_p must be in (0, 1] (got {p})"),
                "top_p",
            ));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v
                && !(-2.0..=2.0).contains(&v)
            {
                return Err(ApiError::invalid(
                    format!("{name} must be between -2 and 2 (got {v})"),
                    name,
                ));
            }
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::invalid(
                format!("stop accepts at most 4 sequences (got {})", stop.len()),
                "stop",
            ));
        }
        let ignore_eos = self
            .ignore_eos
            .or_else(|| self.nvext.as_ref().and_then(|x| x.ignore_eos))
            .unwrap_or(false);
        Ok(GenParams {
            max_tokens,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            ignore_eos,
            temperature: self.temperature,
            top_p: self.top_p,
            seed: self.seed.map(|s| s as u64),
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

impl ChatCompletionRequest {
    pub fn validate(&self) -> Result<GenParams, ApiError> {
        if self.logprobs == Some(true) {
            return Err(ApiError::invalid(
                "logprobs are not supported by this server; omit logprobs or set it to false",
                "logprobs",
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages must contain at least one message",
                "messages",
            ));
        }
        self.common()
            .validate(self.max_completion_tokens.or(self.max_tokens))
    }

    /// The messages as the chat template sees them: `content` flattened to a string.
    pub fn template_messages(&self) -> Result<Vec<Value>, ApiError> {
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut obj = m.rest.clone();
                obj.insert("role".into(), Value::String(m.role.clone()));
                let content = match &m.content {
                    None => Value::Null,
                    Some(MessageContent::Text(t)) => Value::String(t.clone()),
                    Some(MessageContent::Parts(parts)) => {
                        let mut text = String::new();
                        for part in parts {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::invalid(
                                        format!("messages[{i}].content: content parts of type {kind:?} are not supported; this model takes text only"),
                                        "messages",
                                    ));
                                }
                            }
                        }
                        Value::String(text)
                    }
                };
                obj.insert("content".into(), content);
                Ok(Value::Object(obj))
            })
            .collect()
    }

    /// Template context beyond the messages (`tools`, `tool_choice`).
    pub fn template_extra(&self) -> Option<Map<String, Value>> {
        let mut extra = Map::new();
        if let Some(t) = &self.tools {
            extra.insert("tools".into(), t.clone());
        }
        if let Some(t) = &self.tool_choice {
            extra.insert("tool_choice".into(), t.clone());
        }
        (!extra.is_empty()).then_some(extra)
    }
}

impl CompletionRequest {
    pub fn validate(&self) -> Result<GenParams, ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::invalid(
                "echo is not supported by this server",
                "echo",
            ));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid(
                "suffix is not supported by this server",
                "suffix",
            ));
        }
        if let Some(b) = self.best_of
            && b != 1
        {
            return Err(ApiError::invalid(
                format!("best_of = {b} is not supported; send best_of = 1 or omit it"),
                "best_of",
            ));
        }
        if self.logprobs.is_some_and(|l| l > 0) {
            return Err(ApiError::invalid(
                "logprobs are not supported by this server; omit logprobs",
                "logprobs",
            ));
        }
        self.common().validate(self.max_tokens)
    }
}

// === responses ===

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl Usage {
    pub fn new(prompt: u32, completion: u32, cached: u32) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: cached,
            },
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChatChoice<'a>; 1],
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Debug, Serialize)]
pub struct Completion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [CompletionChoice<'a>; 1],
    pub usage: Usage,
}

#[derive(Debug, Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: Vec<ModelObject<'a>>,
}

#[derive(Debug, Serialize)]
pub struct ModelObject<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(json: &str) -> ChatCompletionRequest {
        serde_json::from_str(json).expect("valid test request")
    }

    #[test]
    fn max_completion_tokens_wins_over_max_tokens() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"max_completion_tokens":7}"#,
        );
        assert_eq!(r.validate().map(|p| p.max_tokens).ok(), Some(Some(7)));
    }

    #[test]
    fn n_greater_than_one_is_refused_and_named() {
        let r = chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"n":2}"#);
        let e = r.validate().expect_err("n=2 must be refused");
        assert_eq!(e.param, Some("n"));
        assert!(e.message.contains("not supported"), "{}", e.message);
    }

    #[test]
    fn temperature_out_of_range_is_refused() {
        let r =
            chat(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":3.5}"#);
        assert_eq!(
            r.validate().expect_err("refused").param,
            Some("temperature")
        );
    }

    #[test]
    fn empty_messages_are_refused() {
        let r = chat(r#"{"model":"m","messages":[]}"#);
        assert_eq!(r.validate().expect_err("refused").param, Some("messages"));
    }

    #[test]
    fn more_than_four_stops_are_refused() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
        );
        assert_eq!(r.validate().expect_err("refused").param, Some("stop"));
    }

    #[test]
    fn stop_string_or_list_and_ignore_eos_via_nvext() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stop":"END","nvext":{"ignore_eos":true},"stream":true,"stream_options":{"include_usage":true}}"#,
        );
        let p = r.validate().expect("valid");
        assert_eq!(p.stop, vec!["END".to_string()]);
        assert!(p.ignore_eos && p.stream && p.include_usage);
    }

    #[test]
    fn content_parts_are_flattened_and_images_refused() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}],"name":"bob"}]}"#,
        );
        let msgs = r.template_messages().expect("text parts are fine");
        assert_eq!(msgs[0]["content"], "ab");
        assert_eq!(msgs[0]["name"], "bob");
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#,
        );
        assert!(
            r.template_messages()
                .expect_err("images refused")
                .message
                .contains("image_url")
        );
    }

    #[test]
    fn completion_prompt_forms_parse() {
        for (json, ok) in [
            (r#"{"model":"m","prompt":"hi"}"#, true),
            (r#"{"model":"m","prompt":[1,2,3]}"#, true),
            (r#"{"model":"m","prompt":["a"]}"#, true),
            (r#"{"model":"m","prompt":[[1,2]]}"#, true),
            (r#"{"model":"m","prompt":{"x":1}}"#, false),
        ] {
            assert_eq!(
                serde_json::from_str::<CompletionRequest>(json).is_ok(),
                ok,
                "{json}"
            );
        }
    }

    #[test]
    fn echo_and_logprobs_on_completions_are_refused() {
        let r: CompletionRequest =
            serde_json::from_str(r#"{"model":"m","prompt":"x","echo":true}"#).expect("parses");
        assert_eq!(r.validate().expect_err("refused").param, Some("echo"));
        let r: CompletionRequest =
            serde_json::from_str(r#"{"model":"m","prompt":"x","logprobs":2}"#).expect("parses");
        assert_eq!(r.validate().expect_err("refused").param, Some("logprobs"));
    }
}
