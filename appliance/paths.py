"""Default locations (DESIGN.md section 1): system paths as root, per-user paths otherwise."""
import os
from pathlib import Path

DB_NAME = "ipamd.db"


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/ipamd")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "ipamd"


def default_socket() -> Path:
    if os.environ.get("IPAMD_SOCKET"):
        return Path(os.environ["IPAMD_SOCKET"])
    if os.geteuid() == 0:
        return Path("/run/ipamd/ipamd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or fallback_runtime_dir()
    return Path(runtime) / "ipamd.sock"


def fallback_runtime_dir() -> Path:
    """Where a user's socket goes without XDG_RUNTIME_DIR: made 0700, refused if another
    user owns it (anyone can create it first in /tmp)."""
    return Path(f"/tmp/ipamd-{os.geteuid()}")
