"""`mixq convert` under faults: SIGKILL at random moments, Ctrl-C, a full disk, bad sources found before the first
layer, a measurement of another model. Nothing half-written ever carries the final name, and the same command
always finishes the job."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from mixq.cli.main import main
from mixq.convert.layer_quant import LayerQuantizer
from mixq.errors import MixqError
from mixq.model.shards import ShardWriter

# The smallest model the converter takes (every width a multiple of 32), the cheapest calibration, and a made-up
# measurement (the measurement pass is 90% of a conversion; tests/test_convert.py kills and resumes inside it).
ARGS = ["--rows", "4", "--measure-rows", "2", "--length", "32", "--device", "cpu", "--exllamav2-candidates"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # float sums depend on the thread split: every run alike


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    from conftest import make_hf_mixtral

    from mixq.synthetic.hf_checkpoint import SAMPLE_TEXT, build_tokenizer, save_tokenizer

    path = tmp_path_factory.mktemp("src") / "hf"
    make_hf_mixtral(path, seed=random.randrange(10**6))
    save_tokenizer(str(path), build_tokenizer([SAMPLE_TEXT] * 4, 512), 512)
    rng = random.Random()
    words = "the of and to a in that it was her his she he you not be with as had for at on my".split()
    (path.parent / "cal.txt").write_text(" ".join(rng.choice(words) for _ in range(3000)))
    _made_up_measurement(path, path.parent / "measurement.json")
    return path


def _made_up_measurement(src, dest):
    """Every exllamav2 candidate with its exact bit cost and an accuracy that grows with it."""
    from mixq.convert.candidates import attn_candidates, moe_candidates
    from mixq.convert.pipeline import _block_bits
    from mixq.model.config import MixtralConfig

    cfg = MixtralConfig.from_dir(str(src))
    m = {}
    for i in range(cfg.num_hidden_layers):
        for key, rows in (("self_attn", attn_candidates(False)), ("block_sparse_moe", moe_candidates(False))):
            entries = []
            for r in rows:
                bits = _block_bits(r, cfg)
                qps = {k: qp.to_dict() for k, qp in r.items()}
                entries.append(
                    {"accuracy": 1 - 2.0 ** -(bits / 1e4) * random.uniform(0.9, 1.1), "total_bits": bits, **qps}
                )
            m[f"model.layers.{i}.{key}"] = entries
    dest.write_text(json.dumps({"measurement": m, "last_module_idx": 0}))


def _cmd(src, out, *extra, measurement=True):
    m = ["--measurement", str(src.parent / "measurement.json")] if measurement else []
    return [sys.executable, "-m", "mixq", "convert", str(src), str(out), "--calibration",
            str(src.parent / "cal.txt"), *ARGS, *m, *extra]  # fmt: skip


def _digest(out) -> dict[str, str]:
    return {f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in sorted(os.listdir(out))}


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "out"
    proc = subprocess.run(_cmd(src, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not os.path.exists(f"{out}.work") and not os.path.exists(f"{out}.partial")
    return _digest(out), out


def test_sigkill_at_random_moments_then_the_same_command_gives_identical_files(src, reference, tmp_path):
    reference, _ = reference
    out, work = tmp_path / "out", tmp_path / "out.work"
    kills, started = 0, time.time()
    while kills < 5:
        proc = subprocess.Popen(_cmd(src, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not work.exists():  # past start-up (imports, source checks): the job runs
            time.sleep(0.01)
        deadline = time.time() + random.uniform(0.0, 3.0)
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        rc = proc.wait()
        # Never a partial output under the final name: either nothing, or the complete, identical checkpoint.
        if os.path.exists(out):
            assert rc in (0, -9) and _digest(out) == reference
            shutil.rmtree(out)  # and start again: a finished run must not end the trials early
        assert time.time() - started < 240
    proc = subprocess.run(_cmd(src, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _digest(out) == reference
    assert not os.path.exists(f"{out}.work") and not os.path.exists(f"{out}.partial")


def test_ctrl_c_exits_130_without_traceback_and_resumes(src, reference, tmp_path):
    out = tmp_path / "out"
    env = dict(ENV, MIXQ_TEST_KILL_AFTER="quant:0", MIXQ_TEST_KILL_SIGNAL="INT")
    proc = subprocess.run(_cmd(src, out), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"mixq: interrupted; the same command resumes at quantizing layer 1 of 2 (state in {out}.work)"
    assert not os.path.exists(out) and os.path.exists(f"{out}.work")
    proc = subprocess.run(_cmd(src, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "resuming" in proc.stdout
    assert _digest(out) == reference[0]


def _opts_argv(src, out, *extra, measurement=True):
    return _cmd(src, out, *extra, measurement=measurement)[3:]  # the same command, in-process


def _error_line(capsys) -> str:
    """The one error line on stderr (progress bars may precede it); no traceback, nothing after it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.endswith("\n")
    lines = [line for line in err.splitlines() if line.startswith("mixq: error: ")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    return lines[0]


def test_full_disk_is_one_line_leaves_no_output_and_a_rerun_completes(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    calls = []

    def full(self, tensors):
        calls.append(1)
        if len(calls) > random.randrange(3):  # the disk fills at a random tensor group
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(self.dir, ".output-00001.data"))
        return add(self, tensors)

    add = ShardWriter.add
    monkeypatch.setattr(ShardWriter, "add", full)
    assert main(_opts_argv(src, out)) == 1
    err = _error_line(capsys)
    assert "no space left on device" in err
    assert "the same command resumes at the head and the output files" in err
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial") and os.path.exists(f"{out}.work")
    monkeypatch.setattr(ShardWriter, "add", add)
    assert main(_opts_argv(src, out)) == 0
    assert os.path.exists(out / "output.safetensors") and not os.path.exists(f"{out}.work")


def _break_layer_1(src, tmp_path, how):
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    key = random.choice([k for k in sd if k.startswith("model.layers.1.") and k.endswith("weight")])
    if how == "nan":
        sd[key].view(-1)[random.randrange(sd[key].numel())] = float("nan")
    else:
        sd[key] = sd[key][..., :16].contiguous()
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return bad, key


@pytest.mark.parametrize("how", ["nan", "shape"])
def test_bad_last_layer_is_reported_before_the_first_layer_and_leaves_nothing(src, tmp_path, capsys, how,
                                                                              monkeypatch):  # fmt: skip
    bad, key = _break_layer_1(src, tmp_path, how)

    def no_layer(*a, **kw):
        raise AssertionError("a layer was measured before the bad tensor was found")

    monkeypatch.setattr(LayerQuantizer, "measure_attn", no_layer)
    out = tmp_path / "out"
    assert main(_opts_argv(bad, out, measurement=False)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mixq: error: {key}: ") and err.count("\n") == 1
    assert ("NaN or inf" if how == "nan" else "disagrees with config.json") in err
    assert not os.path.exists(out) and not os.path.exists(f"{out}.work") and not os.path.exists(f"{out}.partial")


def test_failure_after_a_finished_layer_says_where_the_same_command_resumes(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    quantize = LayerQuantizer.quantize_layer

    def fail_on_layer_1(self, *a, **kw):
        if self.index == 1:
            raise MixqError("injected failure")
        return quantize(self, *a, **kw)

    monkeypatch.setattr(LayerQuantizer, "quantize_layer", fail_on_layer_1)
    assert main(_opts_argv(src, out)) == 1
    err = _error_line(capsys)
    assert err.endswith(f"injected failure; the same command resumes at quantizing layer 1 of 2 (state in {out}.work)")
    assert not os.path.exists(out) and os.path.exists(f"{out}.work")


def test_measurement_of_another_model_is_refused(src, reference, tmp_path, capsys):
    from conftest import make_hf_mixtral

    measurement = tmp_path / "measurement.json"
    shutil.copy(reference[1] / "measurement.json", measurement)  # names the model it measured
    assert "model" in json.loads(measurement.read_text())
    other = tmp_path / "other"
    make_hf_mixtral(other, seed=1, intermediate_size=128)  # other shapes
    _copy_tokenizer(src, other)
    shutil.copy(src.parent / "cal.txt", tmp_path / "cal.txt")
    capsys.readouterr()
    assert main(_opts_argv(other, tmp_path / "o2", "--measurement", str(measurement), measurement=False)) == 1
    assert "measured another model: intermediate_size 96 (this model: 128)" in _error_line(capsys)
    # Without the model entry (exllamav2's files have none) the candidates' bit totals give it away.
    data = json.loads(measurement.read_text())
    identity = data.pop("model")
    measurement.write_text(json.dumps(data))
    assert main(_opts_argv(other, tmp_path / "o3", "--measurement", str(measurement), measurement=False)) == 1
    assert "measured a model of other shapes" in _error_line(capsys)
    # Same shapes, another config.json (a different RoPE base): the hash gives it away.
    same = tmp_path / "same"
    make_hf_mixtral(same, seed=2, rope_theta=5000.0)
    _copy_tokenizer(src, same)
    measurement.write_text(json.dumps(json.loads(measurement.read_text()) | {"model": identity}))
    capsys.readouterr()
    assert main(_opts_argv(same, tmp_path / "o4", "--measurement", str(measurement), measurement=False)) == 1
    assert "measured another model (its config.json differ" in _error_line(capsys)
    assert not any(os.path.exists(tmp_path / f"o{i}{s}") for i in (2, 3, 4) for s in ("", ".work", ".partial"))


def _copy_tokenizer(src, dst):
    for f in os.listdir(src):
        if f.startswith(("tokenizer", "special_tokens")):
            shutil.copy(src / f, dst / f)
