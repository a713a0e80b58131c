//! Differential tests: the fast encoder must give exactly the ids the `tokenizers` crate gives.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::{Model, builtin_assets};

fn builtin() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(Model::builtin)
}

/// The ids `tokenizers` gives for `text`.
fn reference(model: &Model, text: &str, add_special_tokens: bool) -> Vec<u32> {
    model
        .tokenizer()
        .encode_fast(text, add_special_tokens)
        .expect("tokenizers encodes")
        .get_ids()
        .to_vec()
}

/// Asserts that `Model::encode` (and the fast encoder, when it serves the call) match `tokenizers` for `text`,
/// with and without special tokens; on a mismatch, shows where.
fn assert_same(model: &Model, text: &str) {
    for add in [false, true] {
        let expected = reference(model, text, add);
        let got = model.encode(text, add).expect("encodes");
        let fast = model.fast_bpe().and_then(|f| f.encode(text, add));
        for (path, ids) in [
            ("Model::encode", Some(&got)),
            ("FastBpe::encode", fast.as_ref()),
        ] {
            let Some(ids) = ids else { continue };
            if *ids != expected {
                let at = ids
                    .iter()
                    .zip(&expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(ids.len().min(expected.len()));
                let window = |v: &[u32]| v[at.saturating_sub(3)..(at + 4).min(v.len())].to_vec();
                let shown: String = text.chars().take(200).collect();
                panic!(
                    "{path} differs from tokenizers (add_special_tokens={add}) at id #{at}: got {:?}, expected {:?} \
                     ({} vs {} ids) for text ({} bytes) starting {shown:?}",
                    window(ids),
                    window(&expected),
                    ids.len(),
                    expected.len(),
                    text.len(),
                );
            }
        }
    }
}

/// A model directory with the built-in model's files, its tokenizer.json edited by `edit`; removed on drop.
struct EditedModel {
    dir: PathBuf,
    model: Model,
}

impl EditedModel {
    fn new(name: &str, edit: impl FnOnce(&mut Value)) -> EditedModel {
        let dir =
            std::env::temp_dir().join(format!("dynamo-fast-bpe-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let mut tokenizer: Value =
            serde_json::from_str(builtin_assets::TOKENIZER).expect("valid tokenizer.json");
        edit(&mut tokenizer);
        std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).expect("write");
        std::fs::write(dir.join("config.json"), builtin_assets::CONFIG).expect("write");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            builtin_assets::TOKENIZER_CONFIG,
        )
        .expect("write");
        let model = Model::from_dir(&dir, Some(name)).expect("edited model loads");
        EditedModel { dir, model }
    }
}

impl Drop for EditedModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Texts exercising every branch of the pre-tokenizer and the added-token split.
const EDGE_CASES: &[&str] = &[
    "",
    " ",
    "  ",
    "\n",
    "a",
    "'",
    "''",
    "'s",
    "I'm here, they'll see; we've said it's 'done' and you'd know. Don't.",
    "I'M SHOUTING, THEY'LL 'S 'T 'RE 'VE 'M 'LL 'D 'S's",
    "'re're 've've 'll'll 'x 'e ''s '''",
    "abc123def 4567 89.10 1,000,000 3.14159 x2 2x",
    "!!! ??? ... --- *** ### <<<>>> ((())) !?.,;:",
    "tabs\tand\t\ttabs\n\nnewlines\r\n\r\nCRLF",
    "multiple   spaces    between     words",
    "trailing spaces   ",
    "trailing newline\n",
    "trailing mix \n \t ",
    "   leading spaces",
    "\n\n\nleading newlines",
    " \n a\n\n b \n\n  c",
    "a \tb\t c \u{a0}d\u{a0} e",
    "caf\u{e9} na\u{ef}ve stra\u{df}e \u{c6}sir",
    "\u{6771}\u{4eac}\u{306f}\u{65e5}\u{672c}\u{306e}\u{9996}\u{90fd}\u{3067}\u{3059}\u{3002}",
    "emoji \u{1f600}\u{1f600} \u{1f44d}\u{1f3fd} \u{1f468}\u{200d}\u{1f469}\u{200d}\u{1f467} flags \u{1f1eb}\u{1f1f7}",
    "combining e\u{301} a\u{300}\u{301} \u{301}alone x\u{20dd}",
    "Arabic \u{645}\u{631}\u{62d}\u{628}\u{627} \u{628}\u{627}\u{644}\u{639}\u{627}\u{644}\u{645} \u{661}\u{662}\u{663}",
    "Devanagari \u{915}\u{93f}\u{924}\u{93e}\u{92c} \u{928}\u{92e}\u{938}\u{94d}\u{924}\u{947} \u{967}\u{968}",
    "Thai \u{e20}\u{e32}\u{e29}\u{e32}\u{e44}\u{e17}\u{e22} Hangul \u{d55c}\u{ad6d}\u{c5b4} Greek \u{3b1}\u{3b2}\u{3b3}",
    "numbers \u{bd}\u{2153} \u{2162}\u{216b} \u{b2}\u{b3} \u{2460} \u{ff11}\u{ff12}",
    "spaces \u{2003}em\u{2009}thin\u{3000}ideo\u{2028}line\u{2029}para\u{85}nel\u{b}vt\u{c}ff",
    "not spaces \u{200b}zwsp\u{feff}bom\u{200d}zwj\u{180e}mvs",
    "control \u{0}\u{1}\u{7f}\u{1b}[0m \u{9f}",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|endoftext|>text <|endoftext|> text",
    "<|im_sta <|im_end| im_end|> <| |> <|<|im_end|>|>",
    "<|im_start|",
    "x'<|im_end|>'s",
    "  <|im_end|>  ",
];

#[test]
fn builtin_model_takes_the_fast_path() {
    assert!(builtin().fast_bpe().is_some());
}

#[test]
fn edge_cases_match_tokenizers() {
    for text in EDGE_CASES {
        assert_same(builtin(), text);
    }
    assert_same(builtin(), &EDGE_CASES.concat());
    assert_same(builtin(), &EDGE_CASES.join(" "));
    assert_same(builtin(), &EDGE_CASES.join("\n"));
}

/// Every file in `dir` with a name ending in `suffix`, sorted, at most `limit`.
fn files(dir: &Path, suffix: &str, limit: usize) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .filter_map(|p| std::fs::read_to_string(&p).ok().map(|t| (p, t)))
        .take(limit)
        .collect()
}

#[test]
fn license_texts_match_tokenizers() {
    let texts = files(Path::new("/usr/share/common-licenses"), "", 100);
    if texts.is_empty() {
        eprintln!("no /usr/share/common-licenses here; skipping");
    }
    for (_, text) in &texts {
        assert_same(builtin(), text);
    }
}

#[test]
fn python_sources_match_tokenizers() {
    let mut texts = Vec::new();
    for dir in [
        "/usr/lib/python3.11",
        "/usr/lib/python3.12",
        "/usr/lib/python3",
    ] {
        texts.extend(files(Path::new(dir), ".py", 40));
    }
    if texts.is_empty() {
        eprintln!("no Python standard library here; skipping");
    }
    for (_, text) in &texts {
        assert_same(builtin(), text);
    }
}

#[test]
fn long_runs_match_tokenizers() {
    let long_word = "abcdefghij".repeat(500);
    let cases = [
        format!("a{}b", " ".repeat(20_000)),
        format!("a{}", " ".repeat(20_000)),
        format!("a{}b", "\n".repeat(5_000)),
        format!("x {} y", long_word),
        "9".repeat(10_000),
        "!?".repeat(5_000),
        "\u{e9}".repeat(3_000),
        "ab".repeat(3_000),
        "aaaa".repeat(2_000),
        "<|im_end|>".repeat(500),
    ];
    for text in &cases {
        assert_same(builtin(), text);
    }
}

#[test]
fn huge_whitespace_runs_are_left_to_tokenizers() {
    // tokenizers' regex engine overflows its stack on a run of about a million whitespace chars followed by
    // more text, and then takes the rest of the text as one word; the fast path hands such texts over.
    let fast = builtin().fast_bpe().expect("fast path");
    let below = format!("a{}b", " ".repeat(MAX_SPACE_RUN - 2));
    assert!(fast.encode(&below, false).is_some());
    assert_same(builtin(), &below);
    let at = format!("a{}b", " ".repeat(MAX_SPACE_RUN));
    assert_eq!(fast.encode(&at, false), None);
    assert_same(builtin(), &at);
    assert_same(builtin(), &format!("a{}b c d", " ".repeat(1_000_000)));
}

#[test]
fn short_and_long_merges_agree() {
    // Words just around the short/long threshold take different merge loops; both must match tokenizers.
    for len in [SHORT_WORD - 1, SHORT_WORD, SHORT_WORD + 1, 2 * SHORT_WORD] {
        for seed in ["the", "a", "ing", "tion", "ee", "xyz"] {
            let word: String = seed.chars().cycle().take(len).collect();
            assert_same(builtin(), &word);
            assert_same(builtin(), &format!(" {word}"));
        }
    }
}

#[test]
fn cached_and_concurrent_encodes_agree() {
    let text = EDGE_CASES.join(" the quick brown fox ");
    let first = builtin().encode(&text, false).expect("encodes");
    let again = builtin().encode(&text, false).expect("encodes");
    assert_eq!(first, again);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| builtin().encode(&text, false).expect("encodes")))
            .collect();
        for h in handles {
            assert_eq!(h.join().expect("thread"), first);
        }
    });
}

#[test]
fn cache_stays_capped() {
    let model = Model::builtin();
    let fast = model.fast_bpe().expect("fast path");
    // Distinct letter-only words, more than the cap.
    let word = |mut i: usize| {
        let mut w = String::from(" ");
        loop {
            w.push(char::from(b'a' + (i % 26) as u8));
            i /= 26;
            if i == 0 {
                return w;
            }
        }
    };
    let mut text = String::new();
    for i in 0..CACHE_CAP + 5_000 {
        text.push_str(&word(i));
        if text.len() > 100_000 {
            assert_eq!(
                fast.encode(&text, false),
                Some(reference(&model, &text, false))
            );
            text.clear();
        }
    }
    assert_eq!(
        fast.encode(&text, false),
        Some(reference(&model, &text, false))
    );
    let cached = fast.cache.read().map(|c| c.len()).unwrap_or(usize::MAX);
    assert!(cached <= CACHE_CAP, "{cached} cached words");
}

#[test]
fn character_classes_agree_with_the_regex_engine() {
    // Spot-check the tables against a `regex` built the way fancy-regex delegates the classes.
    let classes = Classes::get().expect("tables");
    let pattern = |p: &str| {
        let hir = regex_syntax::Parser::new().parse(p).expect("parses");
        match hir.kind() {
            HirKind::Class(Class::Unicode(set)) => set.clone(),
            _ => panic!("not a class"),
        }
    };
    let (l, n, s) = (pattern(r"\p{L}"), pattern(r"\p{N}"), pattern(r"\s"));
    let contains = |set: &regex_syntax::hir::ClassUnicode, c: char| {
        set.ranges().iter().any(|r| r.start() <= c && c <= r.end())
    };
    for c in (0..0x11_0000u32).step_by(7).filter_map(char::from_u32) {
        let expected = if contains(&l, c) {
            CharClass::Letter
        } else if contains(&n, c) {
            CharClass::Number
        } else if contains(&s, c) {
            CharClass::Space
        } else {
            CharClass::Other
        };
        let mut buf = [0u8; 4];
        assert_eq!(classes.at(c.encode_utf8(&mut buf), 0).0, expected, "{c:?}");
    }
    // Marks are not letters; char::is_alphabetic would say otherwise.
    assert_eq!(classes.at("\u{93f}", 0).0, CharClass::Other);
    assert_eq!(classes.at("\u{301}", 0).0, CharClass::Other);
    assert_eq!(classes.at("\u{a0}", 0).0, CharClass::Space);
    assert_eq!(classes.at("\u{200b}", 0).0, CharClass::Other);
}

// === other tokenizer configurations ===

#[test]
fn unsupported_normalizer_falls_back_to_tokenizers() {
    let edited = EditedModel::new("lowercase", |t| {
        t["normalizer"] = json!({"type": "Lowercase"});
    });
    assert!(edited.model.fast_bpe().is_none());
    for text in EDGE_CASES {
        assert_same(&edited.model, text);
    }
    assert_eq!(
        edited.model.encode("HELLO", false).expect("encodes"),
        builtin().encode("hello", false).expect("encodes")
    );
}

#[test]
fn add_prefix_space_falls_back_to_tokenizers() {
    let edited = EditedModel::new("prefix-space", |t| {
        t["pre_tokenizer"]["add_prefix_space"] = json!(true);
    });
    assert!(edited.model.fast_bpe().is_none());
    for text in EDGE_CASES {
        assert_same(&edited.model, text);
    }
}

#[test]
fn stripping_added_tokens_fall_back_to_tokenizers() {
    let edited = EditedModel::new("lstrip", |t| {
        t["added_tokens"][2]["lstrip"] = json!(true);
    });
    assert!(edited.model.fast_bpe().is_none());
    for text in EDGE_CASES {
        assert_same(&edited.model, text);
    }
}

#[test]
fn template_post_processor_is_left_to_tokenizers_when_it_adds_tokens() {
    let edited = EditedModel::new("template", |t| {
        t["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}
        });
    });
    let fast = edited
        .model
        .fast_bpe()
        .expect("fast path without special tokens");
    assert_eq!(fast.encode("hi", true), None);
    assert!(fast.encode("hi", false).is_some());
    assert_eq!(edited.model.encode("hi", true).expect("encodes")[0], 0);
    for text in EDGE_CASES {
        assert_same(&edited.model, text);
    }
}

#[test]
fn sequence_wrappers_and_byte_level_post_processor_take_the_fast_path() {
    let edited = EditedModel::new("sequences", |t| {
        let pre = t["pre_tokenizer"].clone();
        t["pre_tokenizer"] = json!({"type": "Sequence", "pretokenizers": [pre]});
        t["post_processor"] = json!({"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]});
    });
    let fast = edited.model.fast_bpe().expect("fast path");
    assert!(fast.post_adds_nothing);
    for text in EDGE_CASES {
        assert_same(&edited.model, text);
    }
}

#[test]
fn ignore_merges_matches_tokenizers() {
    let edited = EditedModel::new("ignore-merges", |t| {
        t["model"]["ignore_merges"] = json!(true);
    });
    assert!(
        edited
            .model
            .fast_bpe()
            .expect("fast path")
            .whole_words
            .is_some()
    );
    for text in EDGE_CASES {
        assert_same(&edited.model, text);
    }
    for (_, text) in files(Path::new("/usr/share/common-licenses"), "", 3) {
        assert_same(&edited.model, &text);
    }
}

#[test]
fn normalized_and_raw_added_tokens_split_in_tokenizers_order() {
    // "ab" is matched on the normalized text, after "bc" on the raw text: "abc" → "a", "bc".
    let edited = EditedModel::new("added", |t| {
        let tokens = t["added_tokens"].as_array_mut().expect("array");
        for (id, content, normalized, special) in [
            (8192, "ab", true, false),
            (8193, "bc", false, false),
            (8194, " world", true, false),
            (8195, "<tool>", false, true),
            (8196, "<tool><call>", false, true),
            (8197, "hello", true, true),
        ] {
            tokens.push(json!({
                "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": normalized, "special": special
            }));
        }
    });
    assert!(edited.model.fast_bpe().is_some());
    for text in [
        "abc",
        "abab cab bcbc",
        "hello world, hello  world",
        "<tool><call>x</call><tool>ab",
        "<tool><call",
        "xhelloworld",
    ] {
        assert_same(&edited.model, text);
    }
    let bc = edited.model.token_id("bc").expect("an added token");
    assert_eq!(
        edited.model.encode("abc", false).expect("encodes")[1..],
        [bc]
    );
    for text in EDGE_CASES {
        assert_same(&edited.model, text);
    }
}

#[test]
fn non_byte_level_models_are_not_taken() {
    let edited = EditedModel::new("dropout", |t| {
        t["model"]["dropout"] = json!(0.5);
    });
    assert!(edited.model.fast_bpe().is_none());
    let edited = EditedModel::new("suffix", |t| {
        t["model"]["end_of_word_suffix"] = json!("</w>");
    });
    assert!(edited.model.fast_bpe().is_none());
}

// === random text ===

/// Pieces that random texts are made of: every class, contraction pieces and special-token fragments.
const FRAGMENTS: &[&str] = &[
    "a",
    "b",
    "Z",
    "e",
    "s",
    "t",
    "re",
    "ll",
    "the",
    "ing",
    "'",
    "'s",
    "'S",
    "'ve",
    "'LL",
    "'d",
    " ",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\t",
    "\r\n",
    "\u{a0}",
    "\u{3000}",
    "0",
    "7",
    "42",
    "\u{bd}",
    "\u{663}",
    "\u{2162}",
    ".",
    ",",
    "!",
    "?",
    "-",
    "_",
    "(",
    ")",
    "\"",
    "<",
    "|",
    ">",
    "\\",
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_sta",
    "im_end|>",
    "<|",
    "|>",
    "\u{e9}",
    "\u{df}",
    "\u{6771}\u{4eac}",
    "\u{1f600}",
    "\u{301}",
    "e\u{301}",
    "\u{915}\u{93f}",
    "\u{645}\u{631}",
    "\u{200b}",
    "\u{0}",
];

fn fragment_text() -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(FRAGMENTS), 0..48).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn random_fragment_texts_match_tokenizers(text in fragment_text()) {
        assert_same(builtin(), &text);
    }

    #[test]
    fn random_unicode_texts_match_tokenizers(text in "\\PC{0,64}") {
        assert_same(builtin(), &text);
    }

    #[test]
    fn random_words_merge_alike_short_and_long(word in proptest::collection::vec(
        proptest::sample::select(b"etaoin shrdlu".as_slice()), 2..80)
    ) {
        let fast = builtin().fast_bpe().expect("fast path");
        let (mut short, mut long) = (Vec::new(), Vec::new());
        let mut scratch = Scratch::default();
        fast.merge_short(&word, &mut scratch, &mut short);
        fast.merge_long(&word, &mut scratch, &mut long);
        prop_assert_eq!(short, long);
    }
}
