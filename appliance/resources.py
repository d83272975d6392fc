"""Files shipped beside the code, found the same way from a checkout and a frozen executable."""
import sys
from pathlib import Path


def schema_path() -> Path:
    base = getattr(sys, "_MEIPASS", None)  # set by PyInstaller's bootloader
    if base:
        return Path(base) / "schema.sql"
    return Path(__file__).resolve().parent.parent / "schema.sql"
