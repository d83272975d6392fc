"""A failure in a helper thread fails the test, both ways it can: a plain thread's exception
through pyproject.toml's filterwarnings (run here in a nested pytest with the project's own
setting, and once without it, to show the setting is what bites), and a Worker's through
join_all in the main thread (tests/threads.py)."""
import threading
import tomllib
from pathlib import Path

import pytest

from .threads import Worker, join_all

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

A_TEST_WHOSE_THREAD_FAILS = """
import threading

def test_main_thread_passes_but_its_helper_fails():
    def helper():
        assert 1 + 1 == 3, "the helper thread's assert"
    t = threading.Thread(target=helper)
    t.start()
    t.join()
"""


def project_filterwarnings() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["pytest"]["ini_options"]["filterwarnings"]


def test_the_project_setting_fails_a_test_whose_plain_thread_fails(pytester):
    lines = ", ".join(f'"{w}"' for w in project_filterwarnings())
    pytester.makepyprojecttoml(f"[tool.pytest.ini_options]\nfilterwarnings = [{lines}]\n")
    pytester.makepyfile(A_TEST_WHOSE_THREAD_FAILS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*the helper thread's assert*"])


def test_without_the_setting_the_same_failure_is_only_a_warning(pytester):
    pytester.makepyprojecttoml("[tool.pytest.ini_options]\n")
    pytester.makepyfile(A_TEST_WHOSE_THREAD_FAILS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, warnings=1)


def test_join_all_raises_a_workers_failure_in_the_main_thread():
    def fails():
        assert 1 + 1 == 3, "the worker's assert"

    done = threading.Event()
    workers = [Worker(done.set, name="fine"), Worker(fails, name="failing")]
    for w in workers:
        w.start()
    with pytest.raises(AssertionError, match="the worker's assert"):
        join_all(workers, timeout=30)
    assert done.is_set() and not any(w.is_alive() for w in workers)


def test_join_all_names_a_worker_that_does_not_stop():
    stop = threading.Event()
    w = Worker(stop.wait, name="stuck")
    w.start()
    try:
        with pytest.raises(AssertionError, match=r"still running .*\['stuck'\]"):
            join_all([w], timeout=0.2)
    finally:
        stop.set()
        w.join(30)
    assert not w.is_alive()
