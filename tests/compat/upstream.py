"""Starlette's own test files, fetched at test time for the installed version.

The files come from Starlette's source distribution on PyPI (``pip download``,
cached under the virtualenv, or under ``.pytest_cache`` outside one) and are
never copied into this repository. A download that fails raises: CI must fail,
not skip, when the comparison cannot be made.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cache_dir() -> Path:
    if sys.prefix != sys.base_prefix:  # a virtualenv: keep it with the installed packages
        return Path(sys.prefix) / ".cache" / "asgi-redis-kit"
    return ROOT / ".pytest_cache" / "d" / "asgi-redis-kit"


def starlette_version() -> str:
    return importlib.metadata.version("starlette")


def sdist(version: str) -> Path:
    """Starlette ``version``'s source distribution, downloaded once."""
    cache = _cache_dir()
    target = cache / f"starlette-{version}.tar.gz"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    # Into a directory of our own, then renamed: two test runs may download at once.
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        command += ["--no-binary", ":all:", f"starlette=={version}", "--dest", scratch]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        found = list(Path(scratch).glob(f"starlette-{version}.tar.gz"))
        if done.returncode != 0 or len(found) != 1:
            raise RuntimeError(
                f"could not download starlette=={version}'s source distribution from PyPI, "
                "which holds the Starlette tests this suite runs against our middleware "
                f"(pip said: {done.stderr.strip()[-2000:]!r}); check the network or PyPI"
            )
        os.replace(found[0], target)
    return target


def load_test_module(
    relative: str, module_name: str, rewrites: list[tuple[str, str]]
) -> ModuleType:
    """Import ``relative`` (a path inside Starlette's sdist) as ``module_name``.

    Each ``(old, new)`` in ``rewrites`` replaces text that must be there: a file
    that no longer matches fails loudly instead of testing something else. The
    module goes through pytest's assertion rewriting, so failures show values.
    """
    version = starlette_version()
    archive = sdist(version)
    with tarfile.open(archive) as tar:
        member = tar.extractfile(f"starlette-{version}/{relative}")
        if member is None:
            raise RuntimeError(f"starlette {version}'s sdist has no file {relative}")
        source = member.read().decode()
    for old, new in rewrites:
        if old not in source:
            raise RuntimeError(
                f"{relative} of starlette {version} no longer contains {old!r}; "
                "update the rewrites in tests/compat"
            )
        source = source.replace(old, new)
    folder = _cache_dir() / f"starlette-{version}-tests"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{module_name}.py"
    if not path.exists() or path.read_text() != source:
        path.write_text(source)
    pytest.register_assert_rewrite(module_name)
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(folder))
