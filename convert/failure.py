"""How a conversion that stops early ends: one line that says what happened and how to go on, and nothing
left on disk that the next run does not need.

- `OUT.partial` is always removed (the next run rebuilds it from the work directory).
- `OUT.work` is removed when this run created it and no layer was finished (a retry starts from zero anyway);
  otherwise the line says that the same command resumes, and from where.
- A full disk (or any other OSError) becomes a MixqError line naming the file; Ctrl-C stays a
  KeyboardInterrupt (the CLI exits 130) carrying the same resume hint.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from mixq.errors import MixqError


def resume_hint(state: dict, layers: int, own_measure: bool, work_dir: str) -> str | None:
    """Where the same command would go on from, or None if this job finished nothing yet."""
    measured, quantized = state.get("measure_done", -1), state.get("quant_done", -1)
    if quantized >= layers - 1:
        where = "at the head and the output files"
    elif quantized >= 0 or (measured >= layers - 1 and (own_measure or state.get("strategy") is not None)):
        where = f"at quantizing layer {quantized + 1} of {layers}"
    elif own_measure and measured >= 0:
        where = f"at measuring layer {measured + 1} of {layers}"
    else:
        return None
    return f"the same command resumes {where} (state in {work_dir})"


def _os_message(e: OSError, fallback: str) -> str:
    where = e.filename or fallback
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}: no space left on device; free some space"
    return f"{where}: {e.strerror or type(e).__name__}"


@contextmanager
def reported(out: str, work_dir: str, created: bool, hint: Callable[[], str | None]) -> Iterator[None]:
    """Run a conversion; on any failure clean up as described above and re-raise as one line."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(out.rstrip("/") + ".partial", ignore_errors=True)
        try:
            resume = hint()
        except Exception:  # a job.json that never got written: nothing to resume
            resume = None
        if resume is None and created:
            shutil.rmtree(work_dir, ignore_errors=True)
        tail = f"; {resume}" if resume else ""
        if isinstance(e, KeyboardInterrupt):
            raise KeyboardInterrupt(resume or "nothing was finished") from None
        if isinstance(e, MixqError):
            raise type(e)(f"{e}{tail}") from None
        if isinstance(e, OSError):
            raise MixqError(_os_message(e, work_dir) + (tail or "; then run the same command again")) from None
        raise
