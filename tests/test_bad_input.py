"""Bad checkpoints and bad prompts give one-line errors naming the problem, and a non-zero CLI exit."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mixq
from mixq.cli.main import main
from mixq.errors import CheckpointError
from mixq.synthetic.hf_checkpoint import write_random_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model"
    write_random_checkpoint(str(path), seed=int(torch.randint(0, 1000, ())), shard_layers=1)
    return path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _shards(path):
    return sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))


def break_missing_config(path):
    os.remove(path / "config.json")
    return "config.json is missing"


def break_architecture(path):
    _edit_config(path, architectures=["LlamaForCausalLM"], model_type="llama")
    return "LlamaForCausalLM' is not supported"


def break_missing_shard(path):
    os.remove(path / _shards(path)[1])
    return "-00002-of-00003.safetensors: shard listed in model.safetensors.index.json is missing"


def break_truncated_shard(path):
    shard = path / _shards(path)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return "truncated or corrupt"


def break_shape(path):
    _edit_config(path, intermediate_size=512)
    return "disagrees with config.json"


def break_missing_tensor(path):
    shard = path / _shards(path)[0]
    sd = load_file(str(shard))
    key = next(k for k in sd if k.endswith("self_attn.k_proj.weight"))
    del sd[key]
    save_file(sd, str(shard))
    return f"{key}: tensor missing"


BREAKERS = [
    break_missing_config,
    break_architecture,
    break_missing_shard,
    break_truncated_shard,
    break_shape,
    break_missing_tensor,
]


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__[6:])
def test_load_model_error_is_one_line(ckpt, breaker):
    expected = breaker(ckpt)
    with pytest.raises(CheckpointError) as info:
        mixq.load_model(str(ckpt))
    msg = str(info.value)
    assert expected in msg and "\n" not in msg


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__[6:])
def test_cli_reports_bad_checkpoint(ckpt, breaker, capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Some text to score. " * 20)
    expected = breaker(ckpt)
    assert main(["ppl", str(ckpt), "--text", str(text), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_subprocess_exit_code_and_no_traceback(ckpt):
    break_shape(ckpt)
    proc = subprocess.run(
        [sys.executable, "-m", "mixq", "generate", str(ckpt), "--prompt", "Hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "disagrees with config.json" in proc.stderr


def test_empty_prompt(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", ""]) == 1
    assert "prompt is empty" in capsys.readouterr().err


def test_prompt_longer_than_context(ckpt, capsys):
    assert main(["generate", str(ckpt), "--prompt", "word " * 300, "--max-seq-len", "64", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "the context holds 64" in err and err.count("\n") == 1


def test_missing_text_file(ckpt, capsys):
    assert main(["ppl", str(ckpt), "--text", str(ckpt / "nope.txt")]) == 1
    assert "nope.txt: cannot read text file" in capsys.readouterr().err
