import os
import shutil
import sys

import pytest

IN_CI = bool(os.environ.get("CI"))


def need(condition: bool, reason: str) -> None:
    """Skip outside CI when the machine lacks something; in CI a missing thing is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


def need_tool(name: str) -> str:
    path = shutil.which(name)
    need(path is not None, f"{name} is not installed (make test installs it as root)")
    return path


@pytest.fixture(autouse=True, scope="module")
def _no_daemon_left_behind():
    from .daemon_proc import Daemon
    yield
    while Daemon.started:
        Daemon.started.pop().stop()
    netns = sys.modules.get("tests.netns")  # loaded only by tests that make namespaces
    if netns is not None:
        for ns in list(netns.Namespaces.live):  # a test that died before its own cleanup
            ns.cleanup()
