"""Optional packages in tests: skipped only where their extra was not installed.

`scripts/setup.sh` records the extras it installed in `.venv/latenthash-extras`; a package of a recorded extra that
fails to import fails the run (a declared dependency that vanished must not silently skip its tests)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest


def installed_extras() -> set[str]:
    record = Path(sys.prefix) / "latenthash-extras"
    return set(record.read_text().strip().split(",")) if record.is_file() else set()


def need(module: str, extra: str):
    """Import `module` for a test module: skip it when `extra` was not installed, fail when it was."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if extra in installed_extras():
            pytest.fail(f"{module} is missing although setup installed latenthash[{extra}]: {exc}", pytrace=False)
        pytest.skip(f"{module} is not installed (pip install 'latenthash[{extra}]')", allow_module_level=True)
