"""The frozen executable (dist/ipamd, `make dist`): launch, allocate, release, restart."""
import subprocess

from .conftest import need
from .daemon_proc import PYTHON_IPAMD, ROOT, Daemon

FROZEN = ROOT / "dist" / "ipamd"


def frozen() -> str:
    if not FROZEN.exists():
        # make test builds it first; a bare pytest run builds it here.
        subprocess.run(["make", "-C", str(ROOT), "dist"], check=True, capture_output=True)
    need(FROZEN.exists(), "dist/ipamd could not be built")
    return str(FROZEN)


def test_frozen_binary_launch_allocate_release_restart(tmp_path):
    d = Daemon(tmp_path, "--iprange", "10.50.0.0/24", command=[frozen()])
    d.start()
    try:
        drive(d)
    finally:
        d.stop()


def drive(d):
    assert "ranges=10.50.0.0/24" in d.ready_line
    a = d.cli("allocate", "web-1")
    assert (a.returncode, a.stdout) == (0, "10.50.0.1/24\n"), a.stderr
    assert d.cli("allocate", "web-2").stdout == "10.50.0.2/24\n"
    assert d.cli("release", "web-1").returncode == 0
    d.kill()
    d.start()
    assert "allocations=1" in d.ready_line
    assert d.cli("lookup", "web-2").stdout == "10.50.0.2/24\n"
    assert d.cli("lookup", "web-1").returncode == 1
    sql = subprocess.run([frozen(), "sql", str(d.db), "SELECT count(*) FROM freed"],
                         capture_output=True, text=True, timeout=60)
    assert sql.returncode == 0 and "1" in sql.stdout, sql.stderr


def test_frozen_and_venv_are_the_same_program():
    outs = [subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=ROOT).stdout
            for cmd in ([frozen()], PYTHON_IPAMD)]
    assert outs[0] == outs[1] and "launch" in outs[0]


def test_frozen_binaries_join_and_share_over_the_peer_protocol(tmp_path):
    import json
    import re

    from .daemon_proc import wait_until
    (tmp_path / "secret").write_text("frozen-test-secret-0123456789")
    common = ["--iprange", "10.51.0.0/24", "--listen", "127.0.0.1:0", "--secret-file",
              str(tmp_path / "secret"), "--metrics", "127.0.0.1:0"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Daemon(tmp_path / "a", *common, command=[frozen()])
    a.start()
    try:
        port = re.search(r"listen=\S+:(\d+)", a.ready_line).group(1)
        b = Daemon(tmp_path / "b", *common, "--peer", f"127.0.0.1:{port}", command=[frozen()])
        b.start()
        try:
            def status(d):
                return json.loads(d.cli("status", "--json").stdout)
            wait_until("one ring", lambda: status(a)["ring_digest"] == status(b)["ring_digest"]
                       and status(b)["reachable"])
            r = b.cli("allocate", "web-1")  # b owns nothing: a donation from a
            assert r.returncode == 0 and r.stdout.startswith("10.51.0."), r
        finally:
            b.stop()
    finally:
        a.stop()
