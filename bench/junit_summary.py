"""One line per test file from pytest's --junitxml report: passed, failed, errors, skipped, seconds, and the
failing tests' names (the GPU check prints this instead of pytest's full log).

    python -m bench.junit_summary tests.xml
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


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
    lines = []
    for f in sorted(counts):
        c = counts[f]
        line = (f"{f:<40} {int(c['passed']):>4} passed {int(c['failed']):>3} failed {int(c['error']):>3} errors "
                f"{int(c['skipped']):>4} skipped {c['time']:7.1f} s")  # fmt: skip
        if failing[f]:
            line += "  FAILED: " + ", ".join(failing[f][:6]) + (" ..." if len(failing[f]) > 6 else "")
        lines.append(line)
    return lines


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.junit_summary REPORT.xml")
    try:
        print("\n".join(per_file(sys.argv[1])) or "(no tests in the report)")
    except (OSError, ET.ParseError) as e:
        sys.exit(f"junit_summary: cannot read {sys.argv[1]}: {e}")


if __name__ == "__main__":
    main()
