"""The package's layout: every module imports on its own (no import cycle, no hidden order), the public API is
one import away, and the layers contract of `pyproject.toml` holds (import-linter)."""

from __future__ import annotations

import os
import pkgutil
import shutil
import subprocess
import sys

import pytest

import mixq
import mixq.convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> list[str]:
    names = []
    for pkg in (mixq, mixq.convert):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.startswith("mixq._C") and info.name != "mixq.__main__":  # __main__ runs the CLI
                names.append(info.name)
    return sorted(set(names))


# One interpreter loads the third-party libraries once, then forks a child per module: each child starts with
# no mixq module loaded, so a module that only imports after another one (a cycle, a missing import) fails.
_FORK_EACH = r"""
import importlib, os, sys
import numpy, safetensors, tokenizers, torch  # noqa: F401  third-party only
bad = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException as e:
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        bad.append(name)
print("FAILED " + " ".join(bad) if bad else "OK")
"""


def test_every_module_imports_alone():
    mods = _modules()
    assert "mixq.engine.kv_cache" in mods and "mixq.convert.pipeline" in mods, mods
    env = {k: v for k, v in os.environ.items() if k != "MIXQ_CUDA_EMU"}
    r = subprocess.run([sys.executable, "-c", _FORK_EACH, *mods], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stdout + r.stderr


def test_public_api_one_import_away():
    code = (
        "import sys, mixq; assert 'torch' not in sys.modules, 'import mixq loaded torch'; "
        "import mixq.cli.main, mixq.engine, mixq.kernels, mixq.model, mixq.synthetic; "
        "from mixq.engine.generate import Engine; from mixq.engine.sampling import SamplingParams; "
        "assert mixq.Engine is Engine and mixq.SamplingParams is SamplingParams; "
        "assert mixq.load_model.__module__ == 'mixq.model.loader' and callable(mixq.load_tokenizer); "
        "assert mixq.Request.__module__ == 'mixq.engine.generate'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with pytest.raises(AttributeError):
        mixq.no_such_name  # noqa: B018


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    return exe


def test_layers_contract_holds():
    r = subprocess.run([_lint_imports()], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "broken" not in r.stdout.lower() or "0 broken" in r.stdout.lower(), r.stdout


def test_layers_contract_catches_an_upward_import(tmp_path):
    """The contract can fail: a copy of the package where the kernels import the engine breaks it."""
    exe = _lint_imports()
    for d in ("mixq", "convert"):
        shutil.copytree(os.path.join(ROOT, d), tmp_path / d, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), tmp_path)
    with open(tmp_path / "mixq" / "kernels" / "attention.py", "a", encoding="utf-8") as f:
        f.write("\nfrom mixq.engine import sampling  # noqa: E402,F401\n")
    with open(tmp_path / "convert" / "writer.py", "a", encoding="utf-8") as f:
        f.write("\nfrom mixq.cli import main  # noqa: E402,F401\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([exe], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0, r.stdout
    assert "mixq.kernels.attention -> mixq.engine.sampling" in r.stdout, r.stdout
    assert "convert.writer -> mixq.cli.main" in r.stdout, r.stdout


def test_readme_python_example_runs():
    """The README's Python API example, on the embedded demo model on CPU, prints generated text."""
    from mixq.cli.demo import DEMO_DIR

    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = readme.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "mixq.Engine(" in block and "mixq.load_model(" in block
    code = block.replace('"path/to/Mixtral"', repr(DEMO_DIR)).replace('device="cuda"', 'device="cpu"')
    code = code.replace("torch.float16", "torch.float32").replace("max_new_tokens=64", "max_new_tokens=8")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0, "the example printed no text"
