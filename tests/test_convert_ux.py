"""Converter points a new user meets: progress with an ETA inside a layer, and one shape rule with `mixq synth`."""

import io
import os
import random
import re
import sys

import pytest
import torch
from safetensors import safe_open

import mixq
from mixq.convert.pipeline import ConvertOptions, convert
from mixq.errors import MixqError
from mixq.model.archs import check_exl2_shapes
from mixq.model.config import MixtralConfig
from mixq.synthetic.exl2_checkpoint import write_synthetic

VOCAB = 1000  # not a multiple of 32: lm_head is stored 1024 wide, as exllamav2 stores it


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _calibration(path, words: int = 3000) -> str:
    rng = random.Random()
    vocab = "the of and to a in that it was her his she he you not be with as had for at on my".split()
    path.write_text(" ".join(rng.choice(vocab) + ("." if rng.random() < 0.1 else "") for _ in range(words)))
    return str(path)


def _head_width(model_dir: str) -> int:
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(model_dir, name), "pt") as f:
                if "lm_head.q_weight" in f.keys():
                    return f.get_slice("lm_head.q_weight").get_shape()[1]
    raise AssertionError(f"{model_dir}: lm_head is not EXL2")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from conftest import make_hf_mixtral
    from test_convert import _tokenizer_files

    path = tmp_path_factory.mktemp("ux") / "hf"
    make_hf_mixtral(path, vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2)
    _tokenizer_files(path)
    return path


def test_vocab_not_a_multiple_of_32_converts_with_a_padded_head_and_shows_progress(src, tmp_path, monkeypatch):
    cal = _calibration(tmp_path / "cal.txt")
    opts = dict(calibration=[cal], rows=4, measure_rows=2, length=64, device="cpu", extended_candidates=False)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    out = str(tmp_path / "out")
    convert(str(src), out, ConvertOptions(bits=4.0, **opts), log=lambda *_: None)

    # Progress: frames of a bar redrawn in place; one with an ETA long before layer 0 is finished.
    frames = re.split(r"[\r\n]", terminal.getvalue())
    measure = [f for f in frames if f.startswith("measure")]
    steps = int(re.search(r"/(\d+) steps", measure[0]).group(1)) // 2  # per layer (two layers)
    first_done = next(i for i, f in enumerate(measure) if "layer 0, w1/w3" in f)
    early = [f for f in measure[:first_done] if re.search(r"eta \d\d:\d\d", f)]
    assert early, measure[: first_done + 1]
    assert int(re.search(r"\| (\d+)/", early[0]).group(1)) <= steps // 4
    assert any(f.startswith("quantize") and re.search(r"eta \d\d:\d\d", f) for f in frames)

    # The head: EXL2, stored 1024 wide, 1000 logits.
    assert _head_width(out) == 1024
    model = mixq.load_model(out)
    ids = torch.randint(0, VOCAB, (1, 7))
    assert model(ids).shape == (1, 7, VOCAB)
    assert model.lm_head.out_features == VOCAB

    # Without a terminal: no bar, one line per finished layer (quantization only: the measurement is reused).
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    reuse = os.path.join(out, "measurement.json")
    convert(str(src), str(tmp_path / "out3"), ConvertOptions(bits=5.0, measurement=reuse, **opts), log=lambda *_: None)
    lines = [x for x in log.getvalue().splitlines() if x.startswith(("measure", "quantize"))]
    assert [x.split("]")[0].split("[")[0].strip() for x in lines] == ["quantize layer 1/2", "quantize layer 2/2"]
    assert "\r" not in log.getvalue()


def test_synth_follows_the_same_rule(tmp_path):
    cfg = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        max_position_embeddings=128,
    )
    out = str(tmp_path / "synth")
    write_synthetic(out, cfg, 4.0, seed=random.randrange(1000), log=lambda *_: None)
    assert _head_width(out) == 1024  # quantized like the converter's, not left in fp16
    model = mixq.load_model(out)
    assert model(torch.randint(0, VOCAB, (1, 5))).shape == (1, 5, VOCAB)
    # A width that is an input of some matrix is refused by both, with the same line.
    bad = MixtralConfig(**{**cfg.__dict__, "intermediate_size": 80, "raw": {}})
    with pytest.raises(MixqError, match="intermediate_size = 80 is not a multiple of 32"):
        check_exl2_shapes(bad, "x")
    with pytest.raises(MixqError, match="intermediate_size = 80 is not a multiple of 32"):
        write_synthetic(str(tmp_path / "bad"), bad, 4.0, log=lambda *_: None)
