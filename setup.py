"""mixq: a quantized MoE inference runtime.

The CUDA extension `mixq._C` is built only when the installed torch is a CUDA build and nvcc is
found; otherwise a pure-Python package is installed (every op has a PyTorch reference).
Set MIXQ_NO_EXT=1 to skip the extension, MIXQ_FORCE_EXT=1 to fail loudly if it cannot be built.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension_modules() -> tuple[list, dict]:
    if os.environ.get("MIXQ_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    cuda_home = os.environ.get("CUDA_HOME") or (
        "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )
    nvcc = shutil.which("nvcc") or (cuda_home and os.path.join(cuda_home, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        if os.environ.get("MIXQ_FORCE_EXT") == "1":
            raise RuntimeError("MIXQ_FORCE_EXT=1 but torch is not a CUDA build or nvcc was not found")
        print("mixq: torch has no CUDA or nvcc is missing; installing the pure-Python package")
        return [], {}
    if cuda_home:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    # With no GPU visible torch cannot guess the arch list (it raises); default to Hopper.
    if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    sources = sorted(
        os.path.relpath(p, ROOT)
        for pattern in ("csrc/**/*.cpp", "csrc/**/*.cu")
        for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)
    )
    if not sources:
        return [], {}
    nvcc_flags = [
        "-O3",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    ext = cpp_extension.CUDAExtension(
        name="mixq._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="mixq",
    version="0.1.0",
    description="Quantized (EXL2) inference runtime for Mixtral-architecture MoE models",
    python_requires=">=3.10",
    packages=[*find_packages(include=["mixq", "mixq.*"]), "mixq.convert"],
    # convert/ ships inside the mixq package so no top-level `convert` module is installed.
    package_dir={"mixq.convert": "convert"},
    package_data={"mixq": ["models/**/*", "data/**/*", "serve/static/*"], "mixq.convert": ["data/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "numpy",
        "ninja",
        "tokenizers>=0.19",
        "sentencepiece",
        "jinja2",
        "tqdm>=4.60",  # mixq convert's progress bars
        # mixq serve
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "pydantic>=2",
        "prometheus_client",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-xdist",  # the emulated kernel tests on every core (make test-kernels-cpu)
            "transformers>=4.46",
            "hypothesis",
            "ruff",
            "import-linter>=2.1",
            # cuobjdump for the static SASS gates (tests/test_static_gates.py, bench/static_model.py)
            "nvidia-cuda-cuobjdump",
            "nvidia-cuda-nvdisasm",  # cuobjdump -sass runs it
            # the server's tests: the official client, raw HTTP, and the chat page in headless Chromium
            "openai",
            "httpx",
            "playwright",
        ],
        "bench": ["matplotlib", "bitsandbytes==0.50.2"],
    },
    entry_points={"console_scripts": ["mixq=mixq.cli.main:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
