"""List a mutation group's surviving mutants, case-only string changes apart from the rest.

Usage (in mutation/GROUP, after ``mutmut run``; ``make mutation`` calls it):
    python ../../scripts/mutation_survivors.py [MUTMUT]

mutmut mutates every string literal to upper and lower case. Where the string is SQL (keywords,
table and column names), a ``sqlite3.Row`` key or a numpy ``order`` letter, the case does not
matter and the mutant is equivalent; the store alone makes 200 of them. They are counted per
function on one line each, so the survivors a reader must judge are the ones listed in full.
Verdicts come from mutmut's own result files (``mutants/**/*.meta``), diffs from ``mutmut show``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path


def survivors(root: Path) -> list[str]:
    """Names of the mutants whose last run survived (exit code 0 of the test run)."""
    names: list[str] = []
    for meta in sorted(root.rglob("*.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        names += sorted(name for name, code in codes.items() if code == 0)
    return names


def changed_lines(mutmut: str, name: str) -> tuple[list[str], list[str]]:
    """The removed and added lines of the mutant's diff."""
    for _ in range(3):  # mutmut show can fail while a run rewrites its result files: try again
        shown = subprocess.run([mutmut, "show", name], capture_output=True, text=True, check=False)
        if shown.returncode == 0:
            break
    else:
        raise RuntimeError(f"mutmut show {name} failed three times: {shown.stderr.strip()}")
    lines = shown.stdout.splitlines()
    removed = [line[1:] for line in lines if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in lines if line.startswith("+") and not line.startswith("+++")]
    return removed, added


def is_case_only(removed: list[str], added: list[str]) -> bool:
    return (
        bool(removed)
        and len(removed) == len(added)
        and all(a.lower() == b.lower() for a, b in zip(removed, added, strict=True))
    )


def main(mutmut: str = "mutmut") -> None:
    names = survivors(Path("mutants"))
    case_only: dict[str, list[str]] = defaultdict(list)
    others: list[tuple[str, str]] = []
    for name in names:
        removed, added = changed_lines(mutmut, name)
        function, number = name.rsplit("__mutmut_", 1)
        if is_case_only(removed, added):
            case_only[function].append(number)
        else:
            others.append((name, " | ".join(line.strip() for line in added) or "(line removed)"))
    print(f"{len(names)} surviving mutants; mutmut show NAME prints one's diff")
    print(
        f"case-only string changes ({sum(map(len, case_only.values()))}; equivalent where the string is SQL,"
    )
    print("a sqlite3.Row key or a numpy order letter, all case-insensitive):")
    for function, numbers in sorted(case_only.items()):
        print(f"  {function}: {', '.join(sorted(numbers, key=int))}")
    print(f"the rest ({len(others)}), with the mutated line:")
    for name, line in others:
        print(f"  {name}: {line[:160]}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
