"""A host-wide lock around the suite's one-time installers (apt-get, npm prefixes, a pip venv).

The suite runs in several pytest-xdist worker processes, and other runs of it may share the machine. Two
installers of the same thing must not run at once: a second ``apt-get`` fails on dpkg's lock instead of
waiting, and a second ``npm install`` / ``venv --clear`` into the same directory sees (or destroys) a
half-written tree. So every installer checks for its result *while holding* the lock for that target and
installs only when it is missing; the holder after it then finds it there. Checking under the lock costs an
uncontended ``flock`` when everything is installed, and never trusts a file that a running install has
written but not finished.
"""

from __future__ import annotations

import fcntl
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def install_lock(name: str) -> Iterator[None]:
    """Hold ``<temp dir>/agentpg-test-install-<name>.lock`` exclusively for the ``with`` block.

    Blocks until the lock is free. The kernel drops an ``flock`` when its holder dies, so a killed run never
    leaves the lock taken. ``name`` is a plain file-name part (``apt``, an install directory's name).
    """
    path = Path(tempfile.gettempdir()) / f"agentpg-test-install-{name}.lock"
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def npm_install(package: str, version: str, relative_entry: str) -> Path:
    """``package@version`` installed with npm into ``<temp dir>/agentpg-test-npm-<name>-<version>`` (once per
    host, under its :func:`install_lock`); the installed file ``relative_entry`` (under ``node_modules/``).
    Fails the test with npm's stderr when the install does not produce it. npm must be on PATH."""
    import shutil
    import subprocess

    import pytest

    prefix = Path(tempfile.gettempdir()) / f"agentpg-test-npm-{package.rsplit('/', 1)[-1]}-{version}"
    entry = prefix / "node_modules" / relative_entry
    with install_lock(prefix.name):  # checked under the lock: another worker's npm may be half-way through
        if not entry.exists():
            prefix.mkdir(parents=True, exist_ok=True)
            done = subprocess.run([shutil.which("npm") or "npm", "install", "--prefix", str(prefix), "--no-audit",
                                   "--no-fund", f"{package}@{version}"], capture_output=True, text=True,
                                  timeout=300, check=False)
            if done.returncode != 0 or not entry.exists():
                pytest.fail(f"npm install {package}@{version} failed:\n{done.stderr[-2000:]}", pytrace=False)
    return entry
