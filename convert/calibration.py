"""Calibration text -> token rows `[rows, length]` for the measurement and quantization passes."""

from __future__ import annotations

import json
import os

import torch

from mixq.errors import MixqError

BUILTIN = os.path.join(os.path.dirname(__file__), "data", "calibration.txt")


def read_texts(files: list[str]) -> list[str]:
    """Documents from .txt (one document per file), .jsonl (`text` field) or .parquet (`text` column, or all
    string columns joined as exllamav2 does)."""
    docs: list[str] = []
    for path in files:
        if not os.path.isfile(path):
            raise MixqError(f"{path}: calibration file not found")
        ext = os.path.splitext(path)[1].lower()
        try:
            if ext == ".jsonl":
                with open(path, encoding="utf-8") as f:
                    for n, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                docs.append(str(json.loads(line)["text"]))
                            except (json.JSONDecodeError, KeyError, TypeError):
                                raise MixqError(
                                    f"{path}:{n}: each line must be a JSON object with a 'text' field"
                                ) from None
            elif ext == ".parquet":
                docs.extend(_read_parquet(path))
            else:
                with open(path, encoding="utf-8") as f:
                    docs.append(f.read())
        except UnicodeDecodeError:
            raise MixqError(f"{path}: calibration file is not UTF-8 text") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MixqError(f"{', '.join(files)}: calibration data is empty")
    return docs


def _read_parquet(path: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MixqError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow), or pass .txt/.jsonl") from None
    table = pq.read_table(path)
    cols = (
        ["text"]
        if "text" in table.column_names
        else [n for n, t in zip(table.column_names, table.schema.types) if str(t) in ("string", "large_string")]
    )
    if not cols:
        raise MixqError(f"{path}: parquet file has no string column to calibrate on")
    data = [table.column(c).to_pylist() for c in cols]
    return [" ".join(str(v) for v in row if v is not None) for row in zip(*data)]


def token_rows(tokenizer, docs: list[str], rows: int, length: int, source: str) -> torch.Tensor:
    """Tokenize the documents (BOS at each document start), concatenate and cut `rows` rows of `length`.

    Too little text is an error, not silent repetition: repeated rows would overweight some text.
    """
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d))
        if len(ids) >= rows * length:
            break
    need = rows * length
    if len(ids) < need:
        have = len(ids) // length
        raise MixqError(
            f"{source}: calibration text is too short: {len(ids)} tokens, {need} needed for {rows} rows x {length} "
            f"tokens; add text, or lower --rows (at most {have} fit) or --length"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(rows, length)
