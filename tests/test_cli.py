"""The mixq command line on a small random checkpoint (in-process, plus one real subprocess)."""

import math
import random
import subprocess
import sys

import pytest
import torch

import mixq
from mixq.cli.main import main
from mixq.engine.evaluate import perplexity
from mixq.synthetic.hf_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "m"
    write_random_checkpoint(str(path), seed=random.randrange(10**6))
    return str(path)


def test_generate_greedy_streams_prompt_and_continuation(ckpt, capsys):
    assert (
        main(["generate", ckpt, "--prompt", "It is a truth", "--greedy", "--max-new-tokens", "12", "--device", "cpu"])
        == 0
    )
    out = capsys.readouterr().out
    model, tok = mixq.load_model(ckpt), mixq.load_tokenizer(ckpt)
    ids = tok.encode("It is a truth")
    x = torch.tensor([ids])
    for _ in range(12):  # independent greedy loop with full forwards, no cache
        x = torch.cat([x, model(x)[:, -1:].argmax(-1)], 1)
    gen = [t for t in x[0, len(ids) :].tolist()]
    if set(gen) & set(tok.eos_ids):
        gen = gen[: min(gen.index(e) for e in tok.eos_ids if e in gen)]
    assert out == tok.decode(ids + gen) + "\n"


def test_chat_keeps_the_conversation(ckpt):
    proc = subprocess.run(
        [sys.executable, "-m", "mixq", "chat", ckpt, "--greedy", "--max-new-tokens", "5", "--device", "cpu"],
        input="Hello there\n/reset\nHow are you?\nFine.\n/exit\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


def test_ppl_matches_the_library(ckpt, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 30)
    assert main(["ppl", ckpt, "--text", str(text), "--length", "64", "--device", "cpu"]) == 0
    printed = float(capsys.readouterr().out.split()[1])
    tok = mixq.load_tokenizer(ckpt)
    expected = perplexity(mixq.load_model(ckpt), tok.encode(text.read_text()), 64).ppl
    assert math.isclose(printed, expected, rel_tol=1e-3)


def test_info(ckpt, capsys):
    assert main(["info", ckpt]) == 0
    out = capsys.readouterr().out
    cfg = mixq.model.config.MixtralConfig.from_dir(ckpt)
    assert f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}" in out
    assert "PyTorch reference on CPU" in out or "kernels" in out
    assert out.count("f16") >= cfg.num_hidden_layers
