"""One line per test file from pytest's --junitxml report: passed, failed, errors, skipped, seconds, and the
failing tests' names (the GPU check prints this instead of pytest's full log). When pytest was killed before it
wrote the report (a timeout), the same lines come from its `-v` log, without the seconds.

    python -m bench.junit_summary tests.xml [--log tests.log]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

# pytest -v: "tests/test_x.py::test_y[param] PASSED   [ 12%]"
_VERBOSE = re.compile(r"^(\S+\.py)::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_KIND = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
         "XFAIL": "skipped"}  # fmt: skip


def _format(counts: dict, failing: dict, timed: bool = True) -> list[str]:
    lines = []
    for f in sorted(counts):
        c = counts[f]
        took = f"{c['time']:7.1f} s" if timed else "  (from the log)"
        line = (f"{f:<40} {int(c['passed']):>4} passed {int(c['failed']):>3} failed {int(c['error']):>3} errors "
                f"{int(c['skipped']):>4} skipped {took}")  # fmt: skip
        if failing[f]:
            line += "  FAILED: " + ", ".join(failing[f][:6]) + (" ..." if len(failing[f]) > 6 else "")
        lines.append(line)
    return lines


def from_log(path: str) -> list[str]:
    """The per-file lines from a `pytest -v` log (tests that had not finished are not counted)."""
    counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    failing: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            m = _VERBOSE.match(line)
            if m:
                kind = _KIND[m.group(3)]
                counts[m.group(1)][kind] += 1
                if kind in ("failed", "error"):
                    failing[m.group(1)].append(m.group(2))
    return _format(counts, failing, timed=False)


def per_file(path: str) -> list[str]:
    counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    failing: dict[str, list[str]] = defaultdict(list)
    for case in ET.parse(path).getroot().iter("testcase"):
        name = (case.get("classname") or "?").split(".")
        f = "/".join(name[: 2 if name[0] == "tests" else 1]) + ".py"  # tests.test_x.Class -> tests/test_x.py
        c = counts[f]
        c["time"] += float(case.get("time") or 0)
        kinds = {child.tag for child in case}
        kind = "failed" if "failure" in kinds else "error" if "error" in kinds else (
            "skipped" if "skipped" in kinds else "passed")  # fmt: skip
        c[kind] += 1
        if kind in ("failed", "error"):
            failing[f].append(case.get("name") or "?")
    return _format(counts, failing)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="pytest --junitxml file")
    ap.add_argument("--log", help="pytest -v output, read when the report is missing or unreadable")
    args = ap.parse_args()
    try:
        lines = per_file(args.report)
    except (OSError, ET.ParseError) as e:
        if not (args.log and os.path.exists(args.log)):
            sys.exit(f"junit_summary: cannot read {args.report}: {e}")
        print(f"(no junit report: {type(e).__name__}; counted from {args.log})")
        lines = from_log(args.log)
    print("\n".join(lines) or "(no tests)")


if __name__ == "__main__":
    main()
