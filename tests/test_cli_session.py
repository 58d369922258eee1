"""What a new user meets at the command line: help text, refusals, the context limit, Ctrl-C in chat and generate."""

import argparse
import math
import os
import random
import select
import signal
import subprocess
import sys
import time

import pytest

import mixq
from mixq.cli.main import CHAT_HELP, build_parser, main
from mixq.engine.evaluate import perplexity
from mixq.errors import MixqError
from mixq.model.config import MixtralConfig
from mixq.synthetic.hf_checkpoint import SAMPLE_TEXT, build_tokenizer, write_random_checkpoint

SAMPLING_FLAGS = (
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--min-p",
    "--repetition-penalty",
    "--seed",
    "--greedy",
    "--stop",
    "--ignore-eos",
    "--max-seq-len",
    "--cache",
)


def _small_config(context: int) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        max_position_embeddings=context,
        rope_theta=10000.0,
    )


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random model with a 2048-token context: a reply with --ignore-eos runs for minutes on CPU."""
    path = str(tmp_path_factory.mktemp("session") / "m")
    write_random_checkpoint(path, _small_config(2048), seed=random.randrange(10**6))
    return path


@pytest.fixture(scope="module")
def short_ckpt(tmp_path_factory):
    """The same shapes with a context of 48 tokens."""
    path = str(tmp_path_factory.mktemp("short") / "m")
    write_random_checkpoint(path, _small_config(48), seed=random.randrange(10**6))
    return path


def test_help_shows_a_text_and_default_for_every_sampling_flag(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("generate", "chat"):
        sub = commands[command]
        with pytest.raises(SystemExit):
            sub.parse_args(["--help"])
        shown = " ".join(capsys.readouterr().out.split())
        for flag in SAMPLING_FLAGS:
            action = next(a for a in sub._actions if flag in a.option_strings)
            text = " ".join(sub._get_formatter()._expand_help(action).split())
            assert "(default:" in text and len(text) > len("(default: x)") + 10, f"{command} {flag}: {text!r}"
            assert text in shown


def test_argument_errors_exit_2_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate"])
    assert e.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_tokenizer_larger_than_the_embedding_is_refused_at_load(tmp_path, capsys):
    path = str(tmp_path / "m")
    cfg = write_random_checkpoint(path, _small_config(256), seed=random.randrange(10**6))
    big = build_tokenizer([SAMPLE_TEXT] * 4, 2 * cfg.vocab_size)
    big.save(os.path.join(path, "tokenizer.json"))
    prompt = SAMPLE_TEXT[:400]
    assert max(big.encode(prompt).ids) >= cfg.vocab_size  # the old code's IndexError needs an id past the embedding
    assert main(["generate", path, "--prompt", prompt, "--max-new-tokens", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("mixq: error: ")
    assert f"{big.get_vocab_size()} tokens" in err and f"vocab_size is {cfg.vocab_size}" in err
    with pytest.raises(MixqError, match="vocab_size"):
        mixq.load_tokenizer(path)


def test_ppl_default_window_is_the_readmes_256_and_is_printed(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    words = SAMPLE_TEXT.split()
    random.shuffle(words)
    text.write_text(" ".join(words * 3))
    assert main(["ppl", ckpt, "--text", str(text), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "windows of 256 tokens" in out
    tok = mixq.load_tokenizer(ckpt)
    ids = tok.encode(text.read_text())
    assert len(ids) > 512  # so 256 and 512 windows score differently
    expected = perplexity(mixq.load_model(ckpt), ids, 256).ppl
    assert math.isclose(float(out.split()[1]), expected, rel_tol=1e-3)


def test_ppl_window_longer_than_the_context_is_refused(short_ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(SAMPLE_TEXT)
    assert main(["ppl", short_ckpt, "--text", str(text), "--length", "49", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--length 49" in err and "context of 48 tokens" in err


def test_max_seq_len_past_the_context_is_capped_and_the_context_stop_is_reported(short_ckpt, capsys):
    args = ["generate", short_ckpt, "--prompt", "It is a truth", "--max-new-tokens", "1000", "--ignore-eos"]
    assert main(args + ["--max-seq-len", "4096", "--seed", str(random.randrange(1000)), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "--max-seq-len 4096 capped to 48, the model's context" in err
    assert "stopped at the context length, 48 tokens" in err and "that is the model's context" in err
    # A shorter --max-seq-len than the model's: the stop names the flag to raise.
    assert main(args + ["--max-seq-len", "20", "--greedy", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "capped" not in err and "stopped at the context length, 20 tokens" in err and "raise --max-seq-len" in err


class _Session:
    """`mixq chat` (or generate) in a child process with piped stdin and non-blocking reads of its output."""

    def __init__(self, args: list[str]):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mixq", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.out, self.err = b"", b""

    def send(self, line: str) -> None:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_for(self, pred, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and not self._read(0.1):
                raise AssertionError(f"timed out or exited; stdout {self.out[-500:]!r} stderr {self.err[-2000:]!r}")
            self._read(min(left, 0.5))

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to `timeout`); False when nothing came (at EOF too)."""
        ready, _, _ = select.select([self.proc.stdout, self.proc.stderr], [], [], timeout)
        got = False
        for f in ready:
            chunk = os.read(f.fileno(), 65536)
            got |= bool(chunk)
            if f is self.proc.stdout:
                self.out += chunk
            else:
                self.err += chunk
        if ready and not got:
            time.sleep(min(timeout, 0.05))  # both pipes at EOF: select returns at once
        return got

    def finish(self, timeout: float = 60.0) -> int:
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        while self._read(0.05):
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            raise AssertionError("the session did not end")
        return self.proc.returncode

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def __enter__(self) -> "_Session":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # a failed assertion must not leave a reply generating for minutes
            self.proc.kill()
            self.proc.wait(30)


def test_chat_ctrl_c_stops_the_reply_and_commands_answer_locally(ckpt):
    with _Session(["chat", ckpt, "--ignore-eos", "--max-new-tokens", "100000", "--device", "cpu"]) as s:
        s.send("Tell me a very long story")
        s.wait_for(lambda: len(s.out) > 20)  # the reply is streaming (it could run for minutes)
        s.interrupt()
        s.wait_for(lambda: b"(reply stopped)" in s.err, timeout=30)
        s.send("/help")
        s.wait_for(lambda: b"/reset" in s.out and b"/exit" in s.out, timeout=30)
        s.send("/reset")
        s.wait_for(lambda: b"conversation cleared" in s.out, timeout=30)
        s.send("/frobnicate")
        s.wait_for(lambda: b"unknown command /frobnicate" in s.err, timeout=30)
        # Back at the prompt: Ctrl-C there ends the session with 130 and no traceback.
        s.interrupt()
        rc = s.finish()
    assert rc == 130, s.err[-2000:]
    assert b"Traceback" not in s.err
    assert s.err.count(b"(reply stopped)") == 1


def test_chat_eof_ends_with_0_and_help_is_not_sent_to_the_model(ckpt):
    s = _Session(["chat", ckpt, "--greedy", "--max-new-tokens", "3", "--device", "cpu"])
    s.send("/help")
    rc = s.finish()
    assert rc == 0 and b"Traceback" not in s.err
    # Only the help text: no reply was generated for it.
    assert s.out.decode().strip() == CHAT_HELP


def test_generate_ctrl_c_exits_130_without_traceback(ckpt):
    args = ["generate", ckpt, "--prompt", "Once", "--ignore-eos", "--max-new-tokens", "100000", "--device", "cpu"]
    with _Session(args) as s:
        s.wait_for(lambda: len(s.out) > 20)
        s.interrupt()
        rc = s.finish()
    assert rc == 130, s.err[-2000:]
    assert b"Traceback" not in s.err and b"interrupted" in s.err
