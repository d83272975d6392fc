"""Scenario files (tests/scenarios/*.txt) produce exactly their recorded output.

After an intended change of behaviour: `python -m tests.scenario --rewrite`, then read the diff.
"""
from pathlib import Path

import pytest

from .scenario import run_file

FILES = sorted((Path(__file__).parent / "scenarios").glob("*.txt"))


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_scenario(path):
    have, want = run_file(path)
    assert have == want, f"{path.name} differs; `python -m tests.scenario --rewrite` to accept"
