"""scripts/mutation_survivors.py: which mutants count as survivors, and which changes are case-only."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mutation_survivors", ROOT / "scripts" / "mutation_survivors.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_survivors_are_the_mutants_whose_tests_passed(tmp_path: Path) -> None:
    """Exit code 0 (the tests passed on the mutant) is a survivor; 1 (killed), a timeout's negative
    code and None (never run) are not. Files are read in path order, names sorted within each."""
    (tmp_path / "pkg").mkdir()
    codes = {"m.x_f__mutmut_2": 0, "m.x_f__mutmut_1": 0, "m.x_f__mutmut_3": 1, "m.x_g__mutmut_1": -24}
    (tmp_path / "pkg" / "m.py.meta").write_text(
        json.dumps({"exit_code_by_key": codes | {"m.x_h__mutmut_1": None}})
    )
    (tmp_path / "a.py.meta").write_text(json.dumps({"exit_code_by_key": {"a.x_k__mutmut_9": 0}}))
    assert _script().survivors(tmp_path) == ["a.x_k__mutmut_9", "m.x_f__mutmut_1", "m.x_f__mutmut_2"]


def test_case_only_means_every_changed_line_differs_in_case_alone() -> None:
    is_case_only = _script().is_case_only
    assert is_case_only(['    "SELECT n FROM runs"'], ['    "select n from runs"'])
    assert is_case_only(["a", 'r["n"]'], ["a", 'r["N"]'])
    assert not is_case_only(['    "SELECT n FROM runs"'], ['    "XXSELECT n FROM runsXX"'])
    assert not is_case_only(["x = 1"], [])  # a removed line
    assert not is_case_only([], [])  # no diff at all: nothing to call equivalent
    assert not is_case_only(["a", "b"], ["a"])
