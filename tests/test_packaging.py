"""`pip install jwtauth` (not editable, as a user installs it) gets every module of the package: the wheel
holds each source file of jwtauth/, its subpackages' too."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_of_the_package(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("jwtauth-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.startswith("jwtauth/")}
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "jwtauth").rglob("*.py")}
    assert "jwtauth/store/sqlite.py" in sources
    assert sources - packaged == set()
