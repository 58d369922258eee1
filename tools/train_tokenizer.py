"""Train the demo model's Mistral/Llama-style BPE tokenizer and write the Hugging Face tokenizer files.

Layout of the vocabulary: `<unk>`=0, `<s>`=1, `</s>`=2, then the 256 byte tokens `<0x00>`..`<0xFF>` as normal
vocabulary (byte fallback), then the learned pieces. Pre-tokenizer: Metaspace ("▁", prepend_scheme "first").

    python tools/train_tokenizer.py --text /tmp/demo_scratch/splits/train.txt --out /tmp/demo_scratch/tok
"""

from __future__ import annotations

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 2048
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
MODEL_MAX_LENGTH = 1024
# Mistral's chat template: [INST] user [/INST] assistant</s>, system prompt folded into the first user turn.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is defined %}"
    "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- ' [INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional "
    "system message!') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def build_tokenizer(text_path: str, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    if vocab_size % 32:
        raise SystemExit(f"vocab size {vocab_size} must be a multiple of 32")
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS + BYTE_TOKENS,  # fixes ids 0..258; bytes are unmarked below
        min_frequency=2,
        show_progress=False,
        limit_alphabet=200,
    )
    tok.train([text_path], trainer)
    # The byte tokens must be ordinary vocabulary (Mistral style), not special tokens that decoding would skip.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in SPECIALS]
    tok = Tokenizer.from_str(json.dumps(data))
    # Llama/Mistral: encoding adds <s> in front (what `add_bos_token: true` promises to every loader).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    for i, s in enumerate(SPECIALS + BYTE_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    if tok.get_vocab_size() != vocab_size:
        raise SystemExit(f"trained vocab is {tok.get_vocab_size()}, wanted {vocab_size}: use more text")
    return tok


def write_files(tok: Tokenizer, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "TokenizersBackend",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, f, indent=2)
    with open(os.path.join(out, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="/tmp/demo_scratch/splits/train.txt")
    ap.add_argument("--out", default="/tmp/demo_scratch/tok")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = ap.parse_args()
    tok = build_tokenizer(args.text, args.vocab_size)
    write_files(tok, args.out)
    print(f"wrote {args.out} (vocab {tok.get_vocab_size()})")


if __name__ == "__main__":
    main()
