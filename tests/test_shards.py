"""Streamed safetensors shards read back bit for bit by safetensors itself."""

import json
import os
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mixq.model.shards import ShardWriter

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int16, torch.int64, torch.uint8, torch.bool]


def _random_tensor(dtype: torch.dtype) -> torch.Tensor:
    shape = [random.randint(0, 9) for _ in range(random.randint(0, 3))]
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    if dtype == torch.bool:
        return torch.rand(shape) < 0.5
    return torch.randint(0, 100, shape, dtype=dtype)


@pytest.mark.parametrize("shard_bytes", [0, 64, 700])
def test_round_trip_in_shards(tmp_path, shard_bytes):
    parts = [
        {f"p{i}.t{j}": _random_tensor(random.choice(DTYPES)) for j in range(random.randint(1, 5))} for i in range(6)
    ]
    parts[2]["p2.view"] = torch.randn(8, 6)[:, 1:4]  # non-contiguous input
    parts[4]["p4.big"] = torch.randn(200)  # 800 B: more than one shard even when the random tensors are tiny
    w = ShardWriter(str(tmp_path), "model", shard_bytes, metadata={"k": "v"})
    for p in parts:
        w.add(p)
    weight_map = w.finish()
    files = sorted(f for f in os.listdir(tmp_path))
    assert files == sorted(set(weight_map.values()))  # no data or temp files left
    if shard_bytes == 0:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 1 and all(f.startswith("model-") and f"-of-{len(files):05d}" in f for f in files)
    got = {}
    for f in files:
        with safe_open(str(tmp_path / f), "pt") as fh:
            assert fh.metadata() == {"format": "pt", "k": "v"}
            sizes = [fh.get_tensor(k).numel() * fh.get_tensor(k).element_size() for k in fh.keys()]
            # over the limit only when one tensor alone is (empty tensors ride along with it)
            assert shard_bytes == 0 or sum(sizes) <= shard_bytes or sum(s > 0 for s in sizes) == 1
        got.update(load_file(str(tmp_path / f)))
    expected = {k: v for p in parts for k, v in p.items()}
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    assert json.dumps(weight_map)  # plain names, serialisable for an index file


def test_rejects_duplicates_and_unknown_dtypes(tmp_path):
    w = ShardWriter(str(tmp_path), "model")
    w.add({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="a: tensor written twice"):
        w.add({"a": torch.zeros(2)})
    with pytest.raises(TypeError, match="b: dtype"):
        w.add({"b": torch.zeros(2, dtype=torch.complex64)})
