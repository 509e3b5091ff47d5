"""The wheel: built without a warning from the project's own configuration, and carrying every data file.

The full install from pyproject.toml alone (no constraints) runs in CI as scripts/install-smoke.sh.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO

from support.deploy_helpers import package_roots


def _checkout_copy(dest: Path) -> Path:
    """The checkout's tracked and new files, so that the build leaves nothing behind in the repository."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            (dest / name.decode()).write_bytes(src.read_bytes())
    return dest


def _is_machine_pip_notice(line: str) -> bool:
    # this machine's pip.conf names local index folders that may be absent: pip's notice, not the build's
    return line.startswith("WARNING: Location ") and "is ignored" in line


def test_the_wheel_builds_without_warnings_and_ships_every_data_file(tmp_path):
    src = _checkout_copy(tmp_path / "src")
    # no build isolation: the venv's setuptools (what pyproject's build-system asks for) and no network
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    warnings = [line for line in (r.stdout + r.stderr).splitlines()
                if "warning" in line.lower() and not _is_machine_pip_notice(line)]
    assert not warnings, "\n".join(warnings)  # e.g. BuildBackendWarning: `project.license` as a TOML table

    (wheel,) = (tmp_path / "dist").glob("qaas-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    # every file of every package folder that is not Python source is package data and must ship
    tracked = subprocess.run(["git", "ls-files", *package_roots().values()], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
    data = {name for name in tracked if not name.endswith(".py")}
    assert data, "no data files found: the package folders moved?"
    roots = package_roots()
    for name in data:
        folder, _, rest = name.partition("/")
        package = next(pkg for pkg, f in roots.items() if f == folder)
        assert f"{package.replace('.', '/')}/{rest}" in shipped, f"{name} is not in the wheel"
