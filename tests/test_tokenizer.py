"""Tokenizer, chat template, streaming detokenization and stop strings against transformers/sentencepiece."""

from __future__ import annotations

import io
import json
import os
import random

import pytest

from mixq.errors import CheckpointError, MixqError
from mixq.model.tokenizer import StopMatcher, load_tokenizer

WORDS = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have an "
    "they you were her she there been one all we their has would when if so no more time what who will up said"
).split()
UNICODE = ["café", "naïve", "日本", "日本語", "😀", "🚀✨", "Zürich", "ñ", "€5", "Ωμέγα"]


def _random_text(rng: random.Random, n_words: int, unicode: bool = True) -> str:
    parts = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.75:
            w = rng.choice(WORDS)
        elif r < 0.85:
            w = str(rng.randint(0, 10 ** rng.randint(1, 6)))
        elif r < 0.93 or not unicode:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
        else:
            w = rng.choice(UNICODE)
        parts.append(w + rng.choice([" ", " ", " ", " ", ", ", ". ", "\n", "  ", "\n\n"]))
    return "".join(parts)


def _train_bpe(rng: random.Random, vocab_size: int, bos_post_processor: bool):
    """Mistral-style BPE: Metaspace, byte fallback with <0x00>..<0xFF> as ordinary vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = [_random_text(rng, 60, unicode=False) for _ in range(80)]  # a few KB of English-like text
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainee = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainee.pre_tokenizer = metaspace
    trainee.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    learned = json.loads(trainee.to_str())["model"]
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = metaspace
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
        )
    return tok


def _save(path, tok, chat_template: str | None = None, in_config: bool = False, **cfg_extra) -> str:
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
           "add_eos_token": False, "tokenizer_class": "LlamaTokenizerFast", "legacy": False,
           "clean_up_tokenization_spaces": False, **cfg_extra}  # fmt: skip
    if chat_template is not None and in_config:
        cfg["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    if chat_template is not None and not in_config:
        with open(os.path.join(path, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(chat_template)
    return str(path)


@pytest.fixture(scope="module")
def bpe_dirs(tmp_path_factory):
    rng = random.Random()
    dirs = {}
    for post in (True, False):
        d = tmp_path_factory.mktemp(f"bpe_post{int(post)}")
        dirs[post] = _save(d, _train_bpe(rng, rng.randint(500, 900), post))
    return dirs


def _hf(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("post", [True, False])
def test_encode_decode_match_transformers(bpe_dirs, post):
    rng = random.Random()
    ours, hf = load_tokenizer(bpe_dirs[post]), _hf(bpe_dirs[post])
    assert ours.bos_id == hf.bos_token_id and ours.eos_ids[0] == hf.eos_token_id and ours.vocab_size == len(hf)
    texts = [_random_text(rng, rng.randint(1, 40)) for _ in range(30)]
    texts += [" leading space", "trailing  ", "a\n\nb", "日本 😀 café", "x" * 40, "12345 678", "\n", " "]
    for text in texts:
        ids = ours.encode(text)
        ref = hf(text)["input_ids"]
        if not post:  # transformers 5 adds BOS only through tokenizer.json's post-processor; we follow the config
            ref = [hf.bos_token_id] + ref
        assert ids == ref, text
        assert ids.count(ours.bos_id) == 1 and ids[0] == ours.bos_id
        assert ours.decode(ids) == hf.decode(ref, skip_special_tokens=True)
        if not text.startswith(" "):  # Metaspace adds no prefix before a leading space, the decoder strips one
            assert ours.decode(ids) == text  # spaces, newlines and unicode survive
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ref, skip_special_tokens=False)
        assert ours.encode(text, add_bos=False) == hf(text, add_special_tokens=False)["input_ids"]
    pieces = [ours.id_to_piece(i) for i in range(ours.vocab_size)]
    assert pieces == hf.convert_ids_to_tokens(list(range(ours.vocab_size)))


def test_unicode_uses_byte_fallback(bpe_dirs):
    ours = load_tokenizer(bpe_dirs[True])
    ids = ours.encode("😀", add_bos=False)
    pieces = [ours.id_to_piece(i) for i in ids if ours.id_to_piece(i) != "▁"]
    assert pieces == [f"<0x{b:02X}>" for b in "😀".encode()]


def test_special_ids_and_flags_from_config_files(tmp_path):
    rng = random.Random()
    # no post-processor in tokenizer.json: tokenizer_config.json's flags apply (transformers 5 adds nothing here)
    d = _save(tmp_path, _train_bpe(rng, 400, False), add_bos_token=False, add_eos_token=True)
    extra = rng.sample(range(3, 200), 2)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [2, extra[0]]}, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"eos_token_id": extra[1]}, f)
    tok = load_tokenizer(d)
    assert tok.eos_ids == [2, extra[0], extra[1]]
    text = _random_text(rng, 5)
    assert tok.encode(text) == _hf(d)(text, add_special_tokens=False)["input_ids"] + [2]
    # a post-processor that adds BOS wins over the config flags, as in transformers 5
    d2 = _save(tmp_path / "pp", _train_bpe(rng, 400, True), add_bos_token=False)
    assert load_tokenizer(d2).encode(text) == _hf(d2)(text)["input_ids"]
    assert load_tokenizer(d2).encode(text)[0] == 1


def test_missing_or_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"model": [1, 2')
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path))
    d = _save(tmp_path / "ok", _train_bpe(random.Random(), 300, True))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        load_tokenizer(d)
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "tokenizer.model").write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(str(tmp_path / "sp"))
    for e in (CheckpointError, MixqError):
        assert issubclass(CheckpointError, e)


TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "blocks": (
        "{{ bos_token }}\n"
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}\n"
        "<<SYS>>{{ message['content'] | trim }}<</SYS>>\n"
        "    {% elif message['role'] == 'user' %}\n"
        "[INST] {{ message['content'] }} [/INST]\n"
        "    {% else %}\n"
        "{{ message['content'] }}{{ eos_token }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
        "{%- set msgs = messages[1:] %}{%- else %}{%- set sys = none %}{%- set msgs = messages %}{%- endif %}"
        "{{- bos_token }}{%- for m in msgs %}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{- raise_exception('roles must alternate') }}"
        "{%- endif %}{%- if m['role'] == 'user' %}{%- if loop.last and sys %}{{- '[INST] ' + sys + '\\n\\n' }}"
        "{%- else %}{{- '[INST] ' }}{%- endif %}{{- m['content'] | tojson + ' [/INST]' }}"
        "{%- else %}{{- ' ' + m['content'] + eos_token }}{%- endif %}{%- endfor %}"
    ),
}


def _conversation(rng: random.Random, system: bool, turns: int, end_user: bool = True) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": _random_text(rng, rng.randint(1, 8))}] if system else []
    for t in range(turns):
        msgs.append({"role": "user" if t % 2 == 0 else "assistant", "content": _random_text(rng, rng.randint(1, 12))})
    if end_user and msgs and msgs[-1]["role"] != "user":
        msgs.append({"role": "user", "content": _random_text(rng, 3)})
    return msgs


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("where", ["jinja", "config", "config_list"])
def test_chat_template_matches_transformers(tmp_path, name, where):
    rng = random.Random()
    tpl = TEMPLATES[name]
    tok_obj = _train_bpe(rng, 400, True)
    if where == "config_list":
        entries = [{"name": "tool_use", "template": "{{ 'WRONG' }}"}, {"name": "default", "template": tpl}]
        d = _save(tmp_path, tok_obj, entries, in_config=True)
        hf_tpl = tpl
    else:
        d = _save(tmp_path, tok_obj, tpl, in_config=(where == "config"))
        hf_tpl = None
    ours, hf = load_tokenizer(d), _hf(d)
    for _ in range(6):
        msgs = _conversation(rng, rng.random() < 0.5, rng.randint(1, 5))
        for gen in (True, False):
            ref = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=hf_tpl)
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == ref
        text = ours.apply_chat_template(msgs)
        ids = ours.encode_chat(msgs)
        assert ids.count(ours.bos_id) == text.count("<s>") + (0 if text.startswith("<s>") else 1)
        assert ids[0] == ours.bos_id
        assert (
            ids[len(ids) - len(hf(text, add_special_tokens=False)["input_ids"]) :]
            == hf(text, add_special_tokens=False)["input_ids"]
        )


def test_fallback_mistral_template(bpe_dirs):
    rng = random.Random()
    tok = load_tokenizer(bpe_dirs[True])
    for _ in range(5):
        msgs = _conversation(rng, rng.random() < 0.5, rng.randint(1, 6))
        sys_msg = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        turns = msgs[1:] if sys_msg is not None else msgs
        expected = "<s>"
        for k, m in enumerate(turns):
            if m["role"] == "user":
                content = (sys_msg + "\n\n" + m["content"]) if (k == 0 and sys_msg) else m["content"]
                expected += f"[INST] {content} [/INST]"
            else:
                expected += f" {m['content']}</s>"
        assert tok.apply_chat_template(msgs) == expected
        ids = tok.encode_chat(msgs)
        assert ids == [tok.bos_id] + tok.encode(expected[3:], add_bos=False) or ids == tok.encode(
            expected, add_bos=False
        )
        assert ids.count(tok.bos_id) == 1
    with pytest.raises(MixqError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def _train_sentencepiece(tmp_path, rng: random.Random) -> str:
    import sentencepiece as spm

    lines = [_random_text(rng, 30).replace("\n", " ") for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=rng.randint(350, 500),
                                   byte_fallback=True, model_type="bpe", minloglevel=2)  # fmt: skip
    d = tmp_path / "sp"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(model.getvalue())
    return str(d)


def test_sentencepiece_model_matches_sentencepiece(tmp_path):
    import sentencepiece as spm

    rng = random.Random()
    d = _train_sentencepiece(tmp_path, rng)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "tokenizer.model"))
    tok = load_tokenizer(d)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (sp.bos_id(), [sp.eos_id()], sp.get_piece_size())
    for _ in range(30):
        text = _random_text(rng, rng.randint(1, 30))
        ids = tok.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids[1:]) == sp.decode(ids)
    # special tokens rendered by decode keep the spaces sentencepiece gives the text around them
    specials = [sp.bos_id(), sp.eos_id()]
    for _ in range(20):
        ids = sp.encode(_random_text(rng, rng.randint(2, 20)))
        for _ in range(rng.randint(1, 3)):
            ids.insert(rng.randint(1, len(ids)), rng.choice(specials))
        shown = tok.decode(ids, skip_special_tokens=False)
        assert shown.count("<s>") + shown.count("</s>") == sum(i in specials for i in ids)
        assert shown.replace("</s>", "").replace("<s>", "") == sp.decode([i for i in ids if i not in specials])
    # special-token strings in the text map to their ids; each text segment is encoded on its own
    a, b = _random_text(rng, 3), _random_text(rng, 3)
    assert tok.encode(f"{a}</s> {b}") == [sp.bos_id()] + sp.encode(a) + [sp.eos_id()] + sp.encode(" " + b)
    # a rendered chat prompt: "<s>" in the text is the BOS id, not pieces
    ids = tok.encode_chat([{"role": "user", "content": "hello there"}])
    assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1
    assert ids[1:] == sp.encode("[INST] hello there [/INST]")


def _random_ids(rng: random.Random, tok, n: int) -> list[int]:
    ids: list[int] = []
    byte_ids = {b: tok._b.piece_to_id(f"<0x{b:02X}>") for b in range(256)}
    while len(ids) < n:
        r = rng.random()
        if r < 0.4:
            ids += tok.encode(_random_text(rng, rng.randint(1, 4)), add_bos=False)
        elif r < 0.6:  # a multi-byte character spelled with byte pieces, sometimes cut short
            raw = rng.choice(UNICODE).encode()
            raw = raw[: rng.randint(1, len(raw))] if rng.random() < 0.3 else raw
            ids += [byte_ids[b] for b in raw]
        elif r < 0.7:
            ids.append(rng.choice([tok.bos_id, tok.eos_ids[0]]))
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids


@pytest.mark.parametrize("backend", ["json", "sentencepiece"])
def test_stream_decoder_concatenates_to_decode(bpe_dirs, tmp_path, backend):
    rng = random.Random()
    tok = load_tokenizer(bpe_dirs[True] if backend == "json" else _train_sentencepiece(tmp_path, rng))
    for _ in range(40):
        ids = _random_ids(rng, tok, rng.randint(1, 60))
        for skip in (True, False):
            dec = tok.stream_decoder(skip_special_tokens=skip)
            out = "".join(dec.push(i) for i in ids) + dec.flush()
            assert out == tok.decode(ids, skip_special_tokens=skip), ids
    # after a prompt, the continuation keeps its leading space
    for _ in range(20):
        prompt = tok.encode(_random_text(rng, rng.randint(1, 6)))
        gen = tok.encode(_random_text(rng, rng.randint(1, 6)), add_bos=False)
        full, head = tok.decode(prompt + gen), tok.decode(prompt)
        dec = tok.stream_decoder(prompt)
        out = "".join(dec.push(i) for i in gen) + dec.flush()
        assert full.startswith(head) and out == full[len(head) :]


def test_stream_decoder_holds_partial_characters(bpe_dirs):
    tok = load_tokenizer(bpe_dirs[True])
    raw = "日".encode()
    dec = tok.stream_decoder(tok.encode("x"))
    outs = [dec.push(tok._b.piece_to_id(f"<0x{b:02X}>")) for b in raw]
    outs.append(dec.push(tok.encode("the", add_bos=False)[0]))
    assert outs[:-1] == ["", "", ""] and outs[-1].startswith("日")


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Start of the stop string that is completed first while reading `text` (the longest one on a tie)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s) : end] == s]
        if starts:
            return min(starts)
    return None


def test_stop_matcher_random_splits():
    rng = random.Random()
    for _ in range(300):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 40)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, min(len(text) + 1, 8))))
        chunks = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        m, emitted, consumed, stopped = StopMatcher(stops), "", "", False
        for c in chunks:
            consumed += c
            safe, stopped = m.feed(c)
            emitted += safe
            if stopped:
                break
            held = consumed[len(emitted) :]
            assert consumed.startswith(emitted) and all(s not in emitted for s in stops)
            assert not held or any(s.startswith(held) for s in stops)  # holds only a possible stop start
        if not stopped:
            emitted += m.flush()
        cut = _first_stop(text, stops)
        assert stopped == (cut is not None)
        assert emitted == (text if cut is None else text[:cut])
