"""Tokenizer, chat template and streaming detokenization for Llama/Mistral-style models.

Two backends behind one `Tokenizer`: `tokenizer.json` through the `tokenizers` library (what transformers
uses) or, when absent, `tokenizer.model` through sentencepiece. Special tokens are added here, never by
the backend's post-processor, so BOS cannot be added twice.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

from mixq.errors import CheckpointError, MixqError

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

# Mistral's [INST] format; a system message is folded into the first user turn.
MISTRAL_FALLBACK_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('conversation roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system %}{{- '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('only system, user and assistant roles are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e}); restore the file from the original model") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object; restore the file from the original model")
    return data


def _token_str(value) -> str | None:
    """A special token in tokenizer_config.json is a string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class _HFBackend:
    """`tokenizers.Tokenizer` from tokenizer.json; encodes without special tokens."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on malformed files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path}: cannot be read as a tokenizer.json ({msg}); restore the file") from None
        self.size = self.tok.get_vocab_size(with_added_tokens=True)
        added = self.tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.added_ids = set(added)
        self.special_strings = [t.content for t in added.values() if t.special]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def post_processor_adds(self) -> tuple[list[int], list[int]] | None:
        """(ids prepended, ids appended) by tokenizer.json's post-processor, or None without one."""
        if self.tok.post_processor is None:
            return None
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        for i in range(len(full) - len(plain) + 1):
            if full[i : i + len(plain)] == plain:
                return full[:i], full[i + len(plain) :]
        return None


class _SPBackend:
    """sentencepiece model; special-token strings in the text are split out and mapped to their ids."""

    def __init__(self, path: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(path)
        except (OSError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"{path}: cannot be read as a sentencepiece model ({msg}); restore the file"
            ) from None
        self.size = self.sp.get_piece_size()
        self.special_ids = {i for i in range(self.size) if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.added_ids: set[int] = set()
        self.special_strings = [self.sp.id_to_piece(i) for i in sorted(self.special_ids) if self.sp.is_control(i)]
        self._split: re.Pattern | None = None

    def set_special_strings(self, strings: list[str]) -> None:
        self.special_strings = sorted(set(self.special_strings) | set(strings), key=len, reverse=True)
        if not self.special_strings:
            return
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.special_strings) + ")")
        for s in strings:
            self.special_ids.add(self.sp.piece_to_id(s))

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:  # a special-token string
                ids.append(self.sp.piece_to_id(part))
            elif part:  # each segment gets sentencepiece's dummy prefix, as Mistral's reference encoder does
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self.special_ids])
        out, run, first = [], [], True
        for i in ids + [None]:
            if i is not None and i not in self.special_ids:
                run.append(i)
                continue
            if run:
                text = self.sp.decode(run)
                if not first and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text  # sentencepiece strips the dummy prefix of every call, not only the first
                out.append(text)
                first, run = False, []
            if i is not None:
                out.append(self.sp.id_to_piece(i))
                first = False
        return "".join(out)

    def id_to_piece(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if 0 <= i < self.size else None

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def post_processor_adds(self) -> None:
        return None


class Tokenizer:
    """Encode/decode, special tokens and chat template of one model directory (see `load_tokenizer`)."""

    def __init__(self, backend, *, bos: str | None, eos: str | None, unk: str | None, pad: str | None,
                 add_bos: bool, add_eos: bool, extra_eos_ids: Sequence[int] = (), chat_template: str | None = None,
                 template_source: str = "<fallback>"):  # fmt: skip
        self._b = backend
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos, eos, unk, pad
        self.bos_id = self._id(bos)
        self.unk_id = self._id(unk)
        self.pad_id = self._id(pad)
        eos_id = self._id(eos)
        self.eos_ids: list[int] = list(dict.fromkeys(([eos_id] if eos_id is not None else []) + list(extra_eos_ids)))
        self.add_bos = add_bos and self.bos_id is not None
        self.add_eos = add_eos and eos_id is not None
        self.vocab_size: int = backend.size
        self.chat_template = chat_template or MISTRAL_FALLBACK_TEMPLATE
        self._template = _compile_template(self.chat_template, template_source)
        self._plain = [self._is_plain(i) for i in range(self.vocab_size)]

    def _id(self, token: str | None) -> int | None:
        return self._b.piece_to_id(token) if token is not None else None

    def _is_plain(self, i: int) -> bool:
        # whitespace-only pieces are excluded: sentencepiece strips every leading one at the start of a decode
        piece = self._b.id_to_piece(i)
        return (
            piece is not None
            and i not in self._b.added_ids
            and i not in self._b.special_ids
            and not _BYTE_PIECE.match(piece)
            and piece.strip("\u2581 ") != ""
        )

    def is_byte_token(self, i: int) -> bool:
        piece = self._b.id_to_piece(i)
        return piece is not None and bool(_BYTE_PIECE.match(piece)) and i not in self._b.special_ids

    def is_special(self, i: int) -> bool:
        return i in self._b.special_ids

    def is_plain(self, i: int) -> bool:
        """A vocabulary token that is not special, added or a byte-fallback piece (safe to restart decoding at)."""
        return 0 <= i < self.vocab_size and self._plain[i]

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None) -> list[int]:
        ids = self._b.encode(text)
        if (add_bos if add_bos is not None else self.add_bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if (add_eos if add_eos is not None else self.add_eos) and self.eos_ids:
            ids = ids + [self.eos_ids[0]]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._b.decode([int(i) for i in ids], skip_special_tokens)

    def id_to_piece(self, i: int) -> str:
        piece = self._b.id_to_piece(int(i))
        if piece is None:
            raise MixqError(f"token id {i} is outside the tokenizer's vocabulary of {self.vocab_size}")
        return piece

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs) -> str:
        import jinja2

        named = {"bos_token": self.bos_token, "eos_token": self.eos_token, "unk_token": self.unk_token}
        specials = {k: v for k, v in {**named, "pad_token": self.pad_token}.items() if v is not None}
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=kwargs.pop("tools", None),
                documents=kwargs.pop("documents", None),
                **{**specials, **kwargs},
            )
        except jinja2.TemplateError as e:
            raise MixqError(f"chat template: {e}") from None

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation; BOS only if the template did not write it already."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        emits_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, add_bos=self.add_bos and not emits_bos, add_eos=False)

    def stream_decoder(self, prefix_ids: Sequence[int] = (), skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, prefix_ids, skip_special_tokens)


def _compile_template(source: str, where: str):
    """A sandboxed jinja2 template with the environment transformers gives chat templates."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):  # `{% generation %}` marks assistant text for training masks; render as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, "jinja2.ext.loopcontrols"])  # fmt: skip
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{where}: chat template line {e.lineno}: {e.message}; fix or remove it") from None


def _chat_template(path: str, cfg: dict) -> tuple[str | None, str]:
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                return f.read(), jinja_path
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja_path}: not readable ({e}); restore or remove it") from None
    tpl = cfg.get("chat_template")
    where = os.path.join(path, "tokenizer_config.json")
    if isinstance(tpl, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default", next(iter(named.values()), None))
    return (tpl if isinstance(tpl, str) and tpl else None), where


def _eos_list(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def load_tokenizer(path: str) -> Tokenizer:
    """Tokenizer of a model directory: tokenizer.json (or tokenizer.model) plus its config files."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory; give the model directory that holds tokenizer.json")
    cfg = _read_json(os.path.join(path, "tokenizer_config.json")) or {}
    smap = _read_json(os.path.join(path, "special_tokens_map.json")) or {}
    gen = _read_json(os.path.join(path, "generation_config.json")) or {}
    model_cfg = _read_json(os.path.join(path, "config.json")) or {}

    json_path, sp_path = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if os.path.isfile(json_path):
        backend = _HFBackend(json_path)
    elif os.path.isfile(sp_path):
        backend = _SPBackend(sp_path)
    else:
        raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model; copy the model's tokenizer files here")
    rows = model_cfg.get("vocab_size")
    if isinstance(rows, int) and backend.size > rows:
        # An id past the embedding would fail deep in the first forward pass; say which files disagree instead.
        raise CheckpointError(
            f"{path}: the tokenizer has {backend.size} tokens but config.json's vocab_size is {rows} (the rows of the "
            "embedding); use the tokenizer files that belong to this model"
        )

    def special(name: str, default: str | None) -> str | None:
        tok = _token_str(cfg.get(name)) or _token_str(smap.get(name))
        if tok is None and default is not None and backend.piece_to_id(default) is not None:
            tok = default
        return tok

    if isinstance(backend, _SPBackend):
        sp = backend.sp
        defaults = [sp.id_to_piece(i) if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id())]
    else:
        defaults = ["<s>", "</s>", "<unk>", None]
    bos, eos, unk, pad = (special(n, d) for n, d in zip(("bos_token", "eos_token", "unk_token", "pad_token"), defaults))
    if isinstance(backend, _SPBackend):
        backend.set_special_strings([t for t in (bos, eos, unk, pad) if t is not None])

    # Flags: tokenizer.json's post-processor decides when it has one (transformers 5 ignores the config
    # flags then); otherwise tokenizer_config.json, defaulting to Llama's (BOS, no EOS).
    adds = backend.post_processor_adds()
    if adds is not None:
        add_bos = bos is not None and backend.piece_to_id(bos) in adds[0]
        add_eos = eos is not None and backend.piece_to_id(eos) in adds[1]
    else:
        add_bos, add_eos = cfg.get("add_bos_token", True), cfg.get("add_eos_token", False)
    extra_eos = _eos_list(gen.get("eos_token_id")) + _eos_list(model_cfg.get("eos_token_id"))
    extra_eos = [i for i in extra_eos if 0 <= i < backend.size]
    template, where = _chat_template(path, cfg)
    return Tokenizer(backend, bos=bos, eos=eos, unk=unk, pad=pad, add_bos=bool(add_bos), add_eos=bool(add_eos),
                     extra_eos_ids=extra_eos, chat_template=template, template_source=where)  # fmt: skip


class StreamDecoder:
    """Incremental detokenization: the concatenation of `push` results and `flush` equals
    `decode(prefix_ids + pushed)` minus the text of `prefix_ids`.

    Text is decoded from an anchor (the last plain token already emitted), so the leading-space strip of
    Metaspace/sentencepiece decoders only ever touches the anchor's text, and held back while the last
    token is a byte-fallback piece, because a following byte may still join it into one UTF-8 character.
    """

    def __init__(self, tokenizer: Tokenizer, prefix_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self._tok, self._skip = tokenizer, skip_special_tokens
        self._ids = [int(i) for i in prefix_ids]
        self._anchor = 0
        self._advance_anchor(len(self._ids))
        self._text = self._window(len(self._ids))  # decoded text of ids[anchor:read], already emitted

    def _window(self, end: int | None = None) -> str:
        return self._tok.decode(self._ids[self._anchor : end], self._skip)

    def _advance_anchor(self, read: int) -> None:
        for i in range(read - 1, self._anchor, -1):
            if self._tok.is_plain(self._ids[i]):
                self._anchor = i
                return

    def _holding(self) -> bool:
        for i in reversed(self._ids):
            if self._skip and self._tok.is_special(i):
                continue  # skipped tokens vanish before the decoder joins byte pieces
            return self._tok.is_byte_token(i)
        return False

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return "" if self._holding() else self._emit()

    def flush(self) -> str:
        return self._emit()

    def _emit(self) -> str:
        text = self._window()
        new = text[len(self._text) :]
        old_anchor = self._anchor
        self._advance_anchor(len(self._ids))
        self._text = text if self._anchor == old_anchor else self._window()
        return new


class StopMatcher:
    """Stop strings over streamed text: `feed` returns the text safe to show and whether a stop string
    was found; a suffix that may begin a stop string is held back, and the stop string itself is never shown."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = [s for s in dict.fromkeys(stop_strings) if s]
        self.stopped = False
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._held + text
        # The stop string completed first (earliest end; then the longest) wins, so chunking cannot matter.
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buf[: min(hits)[1]], True
        keep = 0
        for s in self.stops:  # the longest suffix of buf that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:n]):
                    keep = n
                    break
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held-back text, once the stream ended without a stop string."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held
