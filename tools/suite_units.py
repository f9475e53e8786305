"""The test suite's units of work and each worker's share, from pytest's own logs (docs/performance.md).

    python -m pytest -v --durations=0 > run1.log      # -v: each test's worker; --durations=0: every test's time
    python tools/suite_units.py run1.log [run2.log ...]

Prints each unit's seconds (setup + call + teardown of its tests, as `tests/conftest.py`'s ``xdist_unit`` groups
them), the mean over the logs given, longest first: the order ``FIRST_UNITS`` should follow. For each log run with
``-v`` it also prints each worker's units in the order it ran them, with their running sum: where the two workers
end, and on which units.
"""
from __future__ import annotations

import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import xdist_unit  # noqa: E402  (tests/conftest.py: the scheduler's own grouping)

DURATION = re.compile(r"([\d.]+)s (setup|call|teardown)\s+(.+?)\s*$")
RAN = re.compile(r"\[(gw\d+)\] \[\s*\d+%\] (?:PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (.+?)\s*$")


def read(log: Path) -> tuple[Counter, dict[str, list[str]]]:
    """Seconds per test id, and each worker's test ids in the order they finished."""
    seconds: Counter = Counter()
    order: dict[str, list[str]] = defaultdict(list)
    for line in log.read_text(errors="replace").splitlines():
        if m := DURATION.match(line):
            seconds[m.group(3)] += float(m.group(1))
        elif m := RAN.match(line):
            order[m.group(1)].append(m.group(2))
    return seconds, order


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip())
        return 2
    mean: Counter = Counter()
    for log in map(Path, argv):
        seconds, order = read(log)
        for test, s in seconds.items():
            mean[xdist_unit(test)] += s / len(argv)
        for worker, tests in sorted(order.items()):
            print(f"{log}: {worker} ran {sum(seconds[t] for t in tests):.1f} s of tests")
            runs: list[list] = []  # [unit, its seconds], in the order the worker ran them
            for test in tests:
                unit = xdist_unit(test)
                if not runs or runs[-1][0] != unit:
                    runs.append([unit, 0.0])
                runs[-1][1] += seconds[test]
            total = 0.0
            for unit, s in runs:
                total += s
                print(f"    {s:6.1f} s  {unit:<40} ends at {total:6.1f} s")
    print(f"units, longest first (mean of {len(argv)} log(s)); {sum(mean.values()):.0f} s in all:")
    for unit, s in mean.most_common():
        print(f"{s:8.1f} s  {unit}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
