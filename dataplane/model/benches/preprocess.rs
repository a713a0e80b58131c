//! Per-request preprocessing costs on the built-in tiny model: tokenizing a long prompt (our byte-level BPE fast
//! path, warm and cold word cache, beside the `tokenizers` crate), rendering a chat
//! template with a 50 KB message, and detokenizing 1,000 generated tokens incrementally (our byte-table fast
//! path beside the `tokenizers` crate's `DecodeStream`, for a ratio that survives noisy machines).
//!
//! Run: `cargo bench -p dynamo-model --bench preprocess -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use dynamo_model::Model;
use serde_json::json;

/// Deterministic text of at least `tokens` tokens, made of the vocabulary's own pieces.
fn prompt(model: &Model, tokens: usize) -> String {
    let vocab = model.card().vocab_size;
    let mut text = String::new();
    let mut i: u32 = 0;
    loop {
        // Walk the vocabulary in a fixed pseudo-random order, skipping the special tokens (0..3).
        let chunk: Vec<u32> = (0..1000)
            .map(|k| 3 + ((i + k).wrapping_mul(7919) % (vocab - 3)))
            .collect();
        i += 1000;
        let piece = model
            .decode(&chunk, true)
            .unwrap_or_default()
            .replace('\u{FFFD}', "");
        text.push_str(&piece);
        if model.encode(&text, false).map(|ids| ids.len()).unwrap_or(0) >= tokens {
            return text;
        }
    }
}

fn bench(c: &mut Criterion) {
    let model = Model::builtin();
    let text = prompt(&model, 13_000);
    let ids = model.encode(&text, false).unwrap_or_default();
    eprintln!("prompt: {} bytes, {} tokens", text.len(), ids.len());

    // The same tokenizer straight from the `tokenizers` crate, for the encode and decode ratios.
    let reference = tokenizers::Tokenizer::from_file(format!(
        "{}/assets/tiny/tokenizer.json",
        std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR")
    ));

    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(ids.len() as u64));
    // `Model::encode` takes the fast byte-level BPE path for this tokenizer; its word cache is warm here.
    group.bench_function("13k_token_prompt/fast_bpe", |b| {
        b.iter(|| model.encode(black_box(&text), false))
    });
    // The fast path's first encode of the prompt: every distinct word is merged once (a fresh model per run).
    group.bench_function("13k_token_prompt/fast_bpe_cold_cache", |b| {
        b.iter_batched_ref(
            Model::builtin,
            |fresh| fresh.encode(black_box(&text), false),
            BatchSize::PerIteration,
        )
    });
    // What `Model::encode` did before the fast path (and still does for other tokenizers).
    if let Ok(reference) = &reference {
        group.bench_function("13k_token_prompt/tokenizers", |b| {
            b.iter(|| {
                reference
                    .encode_fast(black_box(text.as_str()), false)
                    .map(|e| e.get_ids().len())
            })
        });
    }
    group.finish();

    let mut user = String::new();
    for c in text.chars() {
        if user.len() + c.len_utf8() > 50_000 {
            break;
        }
        user.push(c);
    }
    let messages = vec![
        json!({"role": "system", "content": "You are a helpful assistant."}),
        json!({"role": "user", "content": user}),
    ];
    let mut group = c.benchmark_group("render_chat");
    group.throughput(Throughput::Bytes(50_000));
    group.bench_function("2_messages_50kb", |b| {
        b.iter(|| model.render_chat(black_box(&messages), true, None))
    });
    group.finish();

    let generated = &ids[..1000];
    let mut group = c.benchmark_group("decode_1000_tokens");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("decoder_push", |b| {
        b.iter(|| {
            let mut decoder = model.decoder(true);
            let mut bytes = 0;
            for &id in generated {
                bytes += decoder.push(black_box(id)).map(str::len).unwrap_or(0);
            }
            bytes + decoder.flush().len()
        })
    });
    if let Ok(reference) = &reference {
        group.bench_function("tokenizers_decode_stream", |b| {
            b.iter(|| {
                let mut stream = reference.decode_stream(true);
                let mut bytes = 0;
                for &id in generated {
                    bytes += stream
                        .step(black_box(id))
                        .ok()
                        .flatten()
                        .map_or(0, |s| s.len());
                }
                bytes
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
