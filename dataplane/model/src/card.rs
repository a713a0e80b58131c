//! [`ModelCard`]: what the frontend needs to know about a model to validate and stop requests, read from the
//! model directory's JSON files (`config.json`, `generation_config.json`, `tokenizer_config.json`).
//!
//! Not here: the tokenizer and chat template themselves (see `lib.rs`, `template.rs`).

use std::path::PathBuf;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::ModelError;

/// Context length used when neither config.json nor tokenizer_config.json gives one.
pub const DEFAULT_CONTEXT_LENGTH: u32 = 4096;

/// `model_max_length` values above this are "no limit" placeholders (transformers writes 1e30), not real limits.
const MAX_PLAUSIBLE_CONTEXT: u64 = 100_000_000;

/// Facts about a served model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelCard {
    /// Served model name (the OpenAI `model` field).
    pub name: String,
    /// Maximum prompt + completion tokens: config.json `max_position_embeddings`, else tokenizer_config.json
    /// `model_max_length`, else [`DEFAULT_CONTEXT_LENGTH`].
    pub context_length: u32,
    /// Tokenizer vocabulary size including added tokens.
    pub vocab_size: u32,
    /// Token ids that end generation: config.json and generation_config.json `eos_token_id` (int or list)
    /// plus tokenizer_config.json `eos_token`, without duplicates.
    pub eos_token_ids: Vec<u32>,
    /// Ids of all added tokens marked special, ascending.
    pub special_token_ids: Vec<u32>,
    /// tokenizer_config.json `bos_token`.
    pub bos_token: Option<String>,
    /// tokenizer_config.json `eos_token`.
    pub eos_token: Option<String>,
}

/// A parsed JSON model file and where it came from (for error messages).
#[derive(Debug)]
pub(crate) struct JsonFile {
    pub(crate) path: PathBuf,
    pub(crate) value: Value,
}

impl JsonFile {
    pub(crate) fn parse(path: PathBuf, text: &str) -> Result<JsonFile, ModelError> {
        match serde_json::from_str(text) {
            Ok(value) => Ok(JsonFile { path, value }),
            Err(source) => Err(ModelError::ParseJson { path, source }),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.value.get(field).filter(|v| !v.is_null())
    }

    fn invalid(&self, field: &'static str, expected: &'static str) -> ModelError {
        ModelError::InvalidField {
            path: self.path.clone(),
            field,
            expected,
        }
    }

    /// A token given as a string or as an AddedToken object (`{"content": ...}`).
    pub(crate) fn token(&self, field: &'static str) -> Result<Option<String>, ModelError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => match v.get("content").and_then(Value::as_str) {
                Some(s) => Ok(Some(s.to_owned())),
                None => Err(self.invalid(field, "a string or an object with a \"content\" string")),
            },
        }
    }

    /// `eos_token_id`: an int, a list of ints, or absent.
    fn token_ids(&self, field: &'static str) -> Result<Vec<u32>, ModelError> {
        let expected = "a token id or a list of token ids";
        let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| as_id(v).ok_or_else(|| self.invalid(field, expected)))
                .collect(),
            Some(v) => as_id(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.invalid(field, expected)),
        }
    }

    /// A positive integer length field, if present and plausible.
    fn length(&self, field: &'static str) -> Option<u64> {
        let v = self.get(field)?;
        let n = v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 1.0)
                .map(|f| f as u64)
        })?;
        (n > 0 && n <= MAX_PLAUSIBLE_CONTEXT).then_some(n)
    }
}

/// The model directory's optional JSON files, already parsed.
#[derive(Debug, Default)]
pub(crate) struct CardSources {
    pub(crate) config: Option<JsonFile>,
    pub(crate) generation_config: Option<JsonFile>,
    pub(crate) tokenizer_config: Option<JsonFile>,
}

impl CardSources {
    pub(crate) fn card(
        &self,
        name: String,
        tokenizer: &Tokenizer,
    ) -> Result<ModelCard, ModelError> {
        let context_length = self.context_length();
        let bos_token = self
            .tokenizer_config
            .as_ref()
            .map(|f| f.token("bos_token"))
            .transpose()?
            .flatten();
        let eos_token = self
            .tokenizer_config
            .as_ref()
            .map(|f| f.token("eos_token"))
            .transpose()?
            .flatten();

        let mut eos_token_ids = Vec::new();
        for file in [&self.config, &self.generation_config]
            .into_iter()
            .flatten()
        {
            for id in file.token_ids("eos_token_id")? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t))
            && !eos_token_ids.contains(&id)
        {
            eos_token_ids.push(id);
        }

        let mut special_token_ids: Vec<u32> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter_map(|(id, token)| token.special.then_some(id))
            .collect();
        special_token_ids.sort_unstable();

        Ok(ModelCard {
            name,
            context_length,
            vocab_size: u32::try_from(tokenizer.get_vocab_size(true)).unwrap_or(u32::MAX),
            eos_token_ids,
            special_token_ids,
            bos_token,
            eos_token,
        })
    }

    fn context_length(&self) -> u32 {
        let from_config = self.config.as_ref().and_then(|c| {
            [
                "max_position_embeddings",
                "max_sequence_length",
                "seq_length",
                "n_positions",
            ]
            .into_iter()
            .find_map(|field| c.length(field))
            // Multimodal configs (Gemma 3, Llama 4, Qwen-VL) keep the language model's limits in text_config.
            .or_else(|| {
                let text = JsonFile {
                    path: c.path.clone(),
                    value: c.get("text_config")?.clone(),
                };
                text.length("max_position_embeddings")
            })
        });
        let from_tokenizer = || {
            self.tokenizer_config
                .as_ref()
                .and_then(|t| t.length("model_max_length"))
        };
        from_config
            .or_else(from_tokenizer)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(DEFAULT_CONTEXT_LENGTH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, value: Value) -> Option<JsonFile> {
        Some(JsonFile {
            path: PathBuf::from(name),
            value,
        })
    }

    fn card(sources: CardSources) -> Result<ModelCard, ModelError> {
        let model = crate::Model::builtin();
        sources.card("m".to_owned(), model.tokenizer())
    }

    #[test]
    fn context_length_prefers_config_then_tokenizer_config_then_default() -> Result<(), ModelError>
    {
        let both = CardSources {
            config: file(
                "config.json",
                serde_json::json!({"max_position_embeddings": 8192}),
            ),
            tokenizer_config: file(
                "tokenizer_config.json",
                serde_json::json!({"model_max_length": 2048}),
            ),
            ..Default::default()
        };
        assert_eq!(card(both)?.context_length, 8192);

        let tokenizer_only = CardSources {
            config: file("config.json", serde_json::json!({})),
            tokenizer_config: file(
                "tokenizer_config.json",
                serde_json::json!({"model_max_length": 2048}),
            ),
            ..Default::default()
        };
        assert_eq!(card(tokenizer_only)?.context_length, 2048);

        let absurd = CardSources {
            tokenizer_config: file(
                "tokenizer_config.json",
                serde_json::json!({"model_max_length": 1e30}),
            ),
            ..Default::default()
        };
        assert_eq!(card(absurd)?.context_length, DEFAULT_CONTEXT_LENGTH);

        let multimodal = CardSources {
            config: file(
                "config.json",
                serde_json::json!({"text_config": {"max_position_embeddings": 32768}}),
            ),
            ..Default::default()
        };
        assert_eq!(card(multimodal)?.context_length, 32768);
        Ok(())
    }

    #[test]
    fn eos_ids_union_int_list_and_tokenizer_eos_token() -> Result<(), ModelError> {
        let sources = CardSources {
            config: file("config.json", serde_json::json!({"eos_token_id": 7})),
            generation_config: file(
                "generation_config.json",
                serde_json::json!({"eos_token_id": [9, 7, 8]}),
            ),
            tokenizer_config: file(
                "tokenizer_config.json",
                serde_json::json!({"eos_token": {"content": "<|im_end|>", "special": true}, "bos_token": null}),
            ),
        };
        let card = card(sources)?;
        assert_eq!(card.eos_token_ids, vec![7, 9, 8, 2]);
        assert_eq!(card.eos_token.as_deref(), Some("<|im_end|>"));
        assert_eq!(card.bos_token, None);
        Ok(())
    }

    #[test]
    fn missing_eos_fields_give_no_eos_ids() -> Result<(), ModelError> {
        let card = card(CardSources::default())?;
        assert!(card.eos_token_ids.is_empty());
        assert_eq!(card.context_length, DEFAULT_CONTEXT_LENGTH);
        Ok(())
    }

    #[test]
    fn eos_token_id_of_wrong_type_is_an_error_naming_the_file() {
        let sources = CardSources {
            config: file("config.json", serde_json::json!({"eos_token_id": "</s>"})),
            ..Default::default()
        };
        let err = card(sources).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("config.json: field `eos_token_id` must be a token id or a list of token ids")
        );
    }
}
