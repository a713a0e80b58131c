#!/usr/bin/env python3
"""Generate the built-in tiny model that `dynamo-model` embeds (`Model::builtin()`, served as `tiny`).

What it writes into the target directory (default: dataplane/model/assets/tiny):

- tokenizer.json         a byte-level BPE tokenizer with 8192 tokens, trained here, offline;
- tokenizer_config.json  ChatML chat template, eos `<|im_end|>`, pad `<|endoftext|>`, no bos;
- config.json            a Llama-shaped config (vocab size, context length, bos/eos ids).

The training text is deterministic and local: the files in /usr/share/common-licenses (sorted), then the
first MAX_PY_FILES Python standard-library `*.py` files (sorted by name). Nothing is downloaded. The output
is committed to the repository, so nothing is generated at build or run time; rerun this script only to
change the tiny model:

    pip install tokenizers
    python3 hack/mkmodel.py [TARGET_DIR]

Different Python versions ship a different standard library, so a rerun may produce a slightly different
(equally valid) vocabulary; that is fine because the committed files are the reference.
"""

import json
import os
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 8192
CONTEXT_LENGTH = 131072
MAX_PY_FILES = 300
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML: each message as `<|im_start|>{role}\n{content}<|im_end|>\n`, then the assistant header.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def training_files() -> list[str]:
    """The deterministic corpus: licenses first, then a slice of the Python stdlib."""
    files = []
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        files += [str(p) for p in sorted(licenses.iterdir()) if p.is_file()]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files += [str(p) for p in sorted(stdlib.glob("*.py"))[:MAX_PY_FILES]]
    if not files:
        sys.exit("mkmodel: no training text found (looked in /usr/share/common-licenses and the stdlib)")
    return files


def read_corpus(files: list[str]):
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def train() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_corpus(training_files()), trainer=trainer)
    return tok


def write_json(path: Path, value) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, separators=(",", ":"), sort_keys=False)
        f.write("\n")


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else repo / "dataplane/model/assets/tiny"
    out.mkdir(parents=True, exist_ok=True)

    tok = train()
    # Compact JSON keeps the committed asset small.
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False) + "\n", encoding="utf-8")

    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = tok.get_vocab_size(with_added_tokens=True)

    write_json(
        out / "tokenizer_config.json",
        {
            "added_tokens_decoder": {
                str(ids[t]): {
                    "content": t,
                    "lstrip": False,
                    "normalized": False,
                    "rstrip": False,
                    "single_word": False,
                    "special": True,
                }
                for t in SPECIAL_TOKENS
            },
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "model_max_length": CONTEXT_LENGTH,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        },
    )
    write_json(
        out / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": CONTEXT_LENGTH,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
    )
    total = sum(os.path.getsize(out / n) for n in ("tokenizer.json", "tokenizer_config.json", "config.json"))
    print(f"mkmodel: wrote {out} (vocab {vocab_size}, {total} bytes)")


if __name__ == "__main__":
    main()
