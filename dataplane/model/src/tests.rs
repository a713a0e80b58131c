//! Tests of [`Model`]: loading, card, encode/decode, chat templates and the incremental decoder.

use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

type TestResult = Result<(), ModelError>;

const IM_START: u32 = 1;
const IM_END: u32 = 2;

fn msgs(pairs: &[(&str, &str)]) -> Vec<Value> {
    pairs
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect()
}

/// A fresh directory holding the built-in model's files, removed on drop.
struct TempModelDir(PathBuf);

impl TempModelDir {
    fn new(name: &str, tokenizer_config: &str) -> TempModelDir {
        let dir = std::env::temp_dir()
            .join(format!("dynamo-model-{}-{name}", std::process::id()))
            .join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        std::fs::write(dir.join("tokenizer.json"), builtin_assets::TOKENIZER).expect("write");
        std::fs::write(dir.join("config.json"), builtin_assets::CONFIG).expect("write");
        std::fs::write(dir.join("tokenizer_config.json"), tokenizer_config).expect("write");
        TempModelDir(dir)
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.0.join(file), text).expect("write");
    }
}

impl Drop for TempModelDir {
    fn drop(&mut self) {
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir_all(parent);
        }
    }
}

/// The built-in tokenizer_config.json with `chat_template` replaced (or removed when `None`).
fn tokenizer_config_with(template: Option<Value>) -> String {
    let mut config: Value =
        serde_json::from_str(builtin_assets::TOKENIZER_CONFIG).expect("valid json");
    match template {
        Some(t) => config["chat_template"] = t,
        None => {
            config
                .as_object_mut()
                .expect("object")
                .remove("chat_template");
        }
    }
    config.to_string()
}

fn decode_incrementally(mut decoder: Decoder<'_>, ids: &[u32]) -> Result<String, ModelError> {
    let mut out = String::new();
    for &id in ids {
        out.push_str(decoder.push(id)?);
    }
    out.push_str(&decoder.flush());
    Ok(out)
}

// === loading and the card ===

#[test]
fn model_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Model>();
    assert_send_sync::<ModelError>();
}

#[test]
fn builtin_model_loads_with_its_card() {
    let model = Model::builtin();
    let card = model.card();
    assert_eq!(card.name, "tiny");
    assert_eq!(card.context_length, 131_072);
    assert_eq!(card.vocab_size, 8192);
    assert_eq!(card.eos_token_ids, vec![IM_END]);
    assert_eq!(card.special_token_ids, vec![0, IM_START, IM_END]);
    assert_eq!(card.eos_token.as_deref(), Some("<|im_end|>"));
    assert_eq!(card.bos_token, None);
    assert!(model.has_chat_template());
    assert!(
        model.byte_table().is_some(),
        "byte-level tokenizer gets the table fast path"
    );
}

#[test]
fn builtin_model_round_trips_text() -> TestResult {
    let model = Model::builtin();
    let text =
        "Hello, world! The GNU General Public License — naïve café 😀 \n\tdef f(x): return x\n";
    let ids = model.encode(text, true)?;
    assert!(
        ids.len() < text.len(),
        "BPE merges something: {} ids",
        ids.len()
    );
    assert_eq!(model.decode(&ids, false)?, text);
    assert_eq!(decode_incrementally(model.decoder(false), &ids)?, text);
    Ok(())
}

#[test]
fn special_tokens_typed_in_text_are_parsed_as_specials() -> TestResult {
    let model = Model::builtin();
    let ids = model.encode("<|im_start|>user\nhi<|im_end|>", false)?;
    assert_eq!(ids.first(), Some(&IM_START));
    assert_eq!(ids.last(), Some(&IM_END));
    Ok(())
}

#[test]
fn from_dir_uses_custom_served_name() -> TestResult {
    let dir = TempModelDir::new("custom", builtin_assets::TOKENIZER_CONFIG);
    let model = Model::from_dir(&dir.0, Some("my-model"))?;
    assert_eq!(model.card().name, "my-model");
    assert_eq!(model.card().context_length, 131_072);
    assert_eq!(model.card().eos_token_ids, vec![IM_END]);
    assert_eq!(
        model.encode("hello world", false)?,
        Model::builtin().encode("hello world", false)?
    );
    Ok(())
}

#[test]
fn from_dir_name_defaults_to_directory_name() -> TestResult {
    let dir = TempModelDir::new("Qwen3-0.6B", builtin_assets::TOKENIZER_CONFIG);
    assert_eq!(Model::from_dir(&dir.0, None)?.card().name, "Qwen3-0.6B");
    Ok(())
}

#[test]
fn from_dir_reads_generation_config_eos_ids() -> TestResult {
    let dir = TempModelDir::new("genconfig", builtin_assets::TOKENIZER_CONFIG);
    dir.write("generation_config.json", r#"{"eos_token_id": [2, 0]}"#);
    assert_eq!(
        Model::from_dir(&dir.0, None)?.card().eos_token_ids,
        vec![IM_END, 0]
    );
    Ok(())
}

#[test]
fn from_dir_without_tokenizer_json_says_what_is_missing() {
    let dir = std::env::temp_dir().join(format!("dynamo-model-{}-empty", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let err = Model::from_dir(&dir, None)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.starts_with("no tokenizer.json in "), "{err}");
}

#[test]
fn from_dir_with_broken_config_json_names_the_file() {
    let dir = TempModelDir::new("broken", builtin_assets::TOKENIZER_CONFIG);
    dir.write("config.json", "{ not json");
    let err = Model::from_dir(&dir.0, None).err();
    assert!(
        matches!(&err, Some(ModelError::ParseJson { path, .. }) if path.ends_with("config.json")),
        "{err:?}"
    );
}

// === chat templates ===

#[test]
fn chatml_template_renders_exactly() -> TestResult {
    let model = Model::builtin();
    let messages = msgs(&[("system", "You are terse."), ("user", "Hi!")]);
    assert_eq!(
        model.render_chat(&messages, true, None)?,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        model.render_chat(&messages[1..], false, None)?,
        "<|im_start|>user\nHi!<|im_end|>\n"
    );
    Ok(())
}

#[test]
fn rendered_chat_encodes_role_markers_as_special_tokens() -> TestResult {
    let model = Model::builtin();
    let prompt = model.render_chat(&msgs(&[("user", "Hi!")]), true, None)?;
    let ids = model.encode(&prompt, false)?;
    assert_eq!(ids.iter().filter(|&&id| id == IM_START).count(), 2);
    assert_eq!(ids.iter().filter(|&&id| id == IM_END).count(), 1);
    Ok(())
}

/// A Llama-3-Instruct-style template: `messages[0]['role']`, `.strip()`, `raise_exception`, `loop.last`.
const LLAMA3_TEMPLATE: &str = r#"{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'].strip() %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = '' %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if system_message %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' + system_message + '<|eot_id|>' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'].strip() + '<|eot_id|>' }}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
    {%- endif %}
{%- endfor %}
"#;

fn llama3_model() -> Result<Model, ModelError> {
    Model::builtin().with_chat_template(LLAMA3_TEMPLATE.to_owned())
}

#[test]
fn llama3_style_template_renders_like_transformers() -> TestResult {
    let messages = msgs(&[
        ("system", "  Be brief.  "),
        ("user", "Hi there \n"),
        ("assistant", "Hello!"),
        ("user", "Bye"),
    ]);
    // Expected output produced by jinja2 3.1 with transformers' settings (trim_blocks, lstrip_blocks);
    // bos_token is undefined for the tiny model and renders empty.
    assert_eq!(
        llama3_model()?.render_chat(&messages, true, None)?,
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    Ok(())
}

#[test]
fn raise_exception_surfaces_the_template_message() -> TestResult {
    let messages = msgs(&[("user", "a"), ("user", "b")]);
    let err = llama3_model()?.render_chat(&messages, true, None).err();
    match err {
        Some(ModelError::ChatTemplateRejected { message }) => {
            assert_eq!(
                message,
                "Conversation roles must alternate user/assistant/user/assistant/..."
            );
        }
        other => panic!("expected ChatTemplateRejected, got {other:?}"),
    }
    Ok(())
}

/// A Qwen-style ChatML template relying on trim_blocks/lstrip_blocks (no `-` modifiers) and `tojson` tools.
const QWEN_STYLE_TEMPLATE: &str = r#"{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.{% if tools %} Tools:
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}{% endif %}<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"#;

#[test]
fn block_whitespace_and_tools_render_like_transformers() -> TestResult {
    let model = Model::builtin().with_chat_template(QWEN_STYLE_TEMPLATE.to_owned())?;
    let messages = msgs(&[
        ("user", "Hi there \n"),
        ("assistant", "Hello!"),
        ("user", "Bye"),
    ]);
    // Keys in sorted order, so the expectation holds whether or not serde_json preserves insertion order.
    let tools = json!([{"function": {"description": "Get the weather", "name": "get_weather",
        "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}},
        "type": "function"}]);
    let extra = json!({ "tools": tools });
    // Expected output produced by jinja2 3.1 with transformers' settings and tojson.
    assert_eq!(
        model.render_chat(&messages, true, extra.as_object())?,
        "<|im_start|>system\nYou are a helpful assistant. Tools:\n\
         {\"function\": {\"description\": \"Get the weather\", \"name\": \"get_weather\", \"parameters\": \
         {\"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"], \"type\": \"object\"}}, \
         \"type\": \"function\"}\n<|im_end|>\n\
         <|im_start|>user\nHi there \n<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n\
         <|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        model.render_chat(&messages[..1], false, None)?,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there \n<|im_end|>\n"
    );
    Ok(())
}

#[test]
fn tools_and_documents_are_none_unless_given() -> TestResult {
    let model = Model::builtin().with_chat_template(
        "{{ tools is none }} {{ documents is none }}{% if tools is not none %} {{ tools | length }}{% endif %}"
            .to_owned(),
    )?;
    assert_eq!(model.render_chat(&[], false, None)?, "True True");
    let extra = json!({ "tools": [{"type": "function"}] });
    assert_eq!(
        model.render_chat(&[], false, extra.as_object())?,
        "False True 1"
    );
    Ok(())
}

#[test]
fn raise_exception_is_a_request_error() -> TestResult {
    let err = llama3_model()?
        .render_chat(&msgs(&[("assistant", "a")]), true, None)
        .err();
    assert!(err.is_some_and(|e| e.is_request_error()));
    Ok(())
}

#[test]
fn extra_context_cannot_override_messages() -> TestResult {
    let model = Model::builtin();
    let extra = json!({ "messages": [], "add_generation_prompt": false });
    let out = model.render_chat(&msgs(&[("user", "x")]), true, extra.as_object())?;
    assert_eq!(
        out,
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    );
    Ok(())
}

#[test]
fn missing_chat_template_error_says_how_to_fix() -> TestResult {
    let dir = TempModelDir::new("notemplate", &tokenizer_config_with(None));
    let model = Model::from_dir(&dir.0, None)?;
    assert!(!model.has_chat_template());
    let err = model
        .render_chat(&msgs(&[("user", "x")]), true, None)
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err,
        Some(format!(
            "tokenizer_config.json in {} has no chat_template; pass --chat-template or use /v1/completions",
            dir.0.display()
        ))
    );
    // Completions still work.
    assert!(!model.encode("x", true)?.is_empty());
    Ok(())
}

#[test]
fn template_in_list_form_uses_default() -> TestResult {
    let list = json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"},
    ]);
    let dir = TempModelDir::new("listform", &tokenizer_config_with(Some(list)));
    let model = Model::from_dir(&dir.0, None)?;
    assert_eq!(
        model.render_chat(&msgs(&[("user", "x")]), true, None)?,
        "[user]x"
    );
    Ok(())
}

#[test]
fn template_list_without_default_is_an_error_listing_the_names() {
    let list =
        json!([{"name": "tool_use", "template": "TOOLS"}, {"name": "rag", "template": "RAG"}]);
    let dir = TempModelDir::new("nodefault", &tokenizer_config_with(Some(list)));
    let err = Model::from_dir(&dir.0, None).err();
    assert!(
        matches!(&err, Some(ModelError::NoDefaultChatTemplate { names, .. }) if names == "tool_use, rag"),
        "{err:?}"
    );
}

#[test]
fn chat_template_jinja_file_is_used_when_tokenizer_config_has_none() -> TestResult {
    let dir = TempModelDir::new("jinjafile", &tokenizer_config_with(None));
    dir.write(
        "chat_template.jinja",
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\n",
    );
    let model = Model::from_dir(&dir.0, None)?;
    // A single trailing newline of the template file is dropped, as in jinja2.
    assert_eq!(
        model.render_chat(&msgs(&[("user", "x")]), true, None)?,
        "<user>x"
    );
    Ok(())
}

#[test]
fn broken_template_fails_at_load_with_its_line() {
    let dir = TempModelDir::new(
        "badtemplate",
        &tokenizer_config_with(Some(json!("line one\n{% for %}"))),
    );
    let err = Model::from_dir(&dir.0, None).err();
    assert!(
        matches!(&err, Some(ModelError::CompileChatTemplate { line: Some(2), origin, .. }) if origin.ends_with("tokenizer_config.json")),
        "{err:?}"
    );
}

// === incremental decoding ===

#[test]
fn decoder_returns_nothing_then_the_char_when_utf8_is_split_across_tokens() -> TestResult {
    let model = Model::builtin();
    let table = model.byte_table().expect("byte-level");
    let byte = |b| detok::byte_token_id(table, b).expect("every byte has a token");
    for text in ["é", "😀"] {
        let ids: Vec<u32> = text.bytes().map(byte).collect();
        for mut decoder in [
            model.decoder(false),
            Decoder::stream(model.tokenizer(), false),
        ] {
            let (last, init) = ids.split_last().expect("non-empty");
            for &id in init {
                let path = format!("{decoder:?}");
                assert_eq!(decoder.push(id)?, "", "{path} holds back a partial char");
            }
            assert_eq!(decoder.push(*last)?, text);
            assert_eq!(decoder.flush(), "");
        }
    }
    Ok(())
}

#[test]
fn decoder_flush_releases_an_incomplete_char_as_replacement() -> TestResult {
    let model = Model::builtin();
    let table = model.byte_table().expect("byte-level");
    let first = detok::byte_token_id(table, "é".as_bytes()[0]).expect("byte token");
    let mut decoder = model.decoder(false);
    assert_eq!(decoder.push(first)?, "");
    assert_eq!(decoder.flush(), "\u{FFFD}");
    assert_eq!(model.decode(&[first], false)?, "\u{FFFD}");
    Ok(())
}

#[test]
fn skip_special_tokens_hides_im_end() -> TestResult {
    let model = Model::builtin();
    let ids = model.encode("Done.<|im_end|>", false)?;
    assert_eq!(ids.last(), Some(&IM_END));
    assert_eq!(decode_incrementally(model.decoder(true), &ids)?, "Done.");
    assert_eq!(
        decode_incrementally(model.decoder(false), &ids)?,
        "Done.<|im_end|>"
    );
    assert_eq!(model.decode(&ids, true)?, "Done.");
    Ok(())
}

#[test]
fn unknown_token_ids_decode_to_nothing() -> TestResult {
    let model = Model::builtin();
    let mut decoder = model.decoder(false);
    assert_eq!(decoder.push(u32::MAX)?, "");
    assert_eq!(model.decode(&[u32::MAX], false)?, "");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any id sequence, pushes + flush equal a one-shot decode (both U+FFFD-lossy on invalid UTF-8).
    #[test]
    fn incremental_decode_equals_full_decode(ids in proptest::collection::vec(0u32..8200, 0..48), skip in any::<bool>()) {
        let model = shared_model();
        let full = model.decode(&ids, skip).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let fast = decode_incrementally(model.decoder(skip), &ids).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&fast, &full);
    }

    /// On text the tokenizer produced (always valid UTF-8), both decoder paths reproduce the text exactly.
    #[test]
    fn decoders_reproduce_encoded_text(text in "\\PC{0,40}") {
        let model = shared_model();
        let ids = model.encode(&text, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let fast = decode_incrementally(model.decoder(false), &ids).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let slow = decode_incrementally(Decoder::stream(model.tokenizer(), false), &ids)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&fast, &text);
        prop_assert_eq!(&slow, &text);
    }
}

/// The built-in model, loaded once for the property tests.
fn shared_model() -> &'static Model {
    static MODEL: std::sync::OnceLock<Model> = std::sync::OnceLock::new();
    MODEL.get_or_init(Model::builtin)
}
