"""Install a cell's pins into its virtualenv with uv, and classify a failure as unresolvable or not.

torch: the matrix pins an exact version. On a CPU machine whose pip configuration names a find-links folder
holding the CPU wheel (or with PIP_FIND_LINKS set), uv is pointed at it, so no CUDA wheels are downloaded. A
GPU machine without such a folder gets the CUDA build of the same pin from the index. MOE_SHIMS_TORCH
replaces the torch requirement (e.g. "torch==2.13.0+cu128") and MOE_SHIMS_FIND_LINKS the folder, without
editing code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from .matrix import SUPPORT_PACKAGES, Cell, pin

UNRESOLVABLE_MARKERS = (
    "No solution found", "we can conclude", "not found in the package registry", "no version of",
    "Could not find a version", "ResolutionImpossible", "conflicting dependencies",
)


class InstallError(RuntimeError):
    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def find_links() -> list[str]:
    """Folders of local wheels, from MOE_SHIMS_FIND_LINKS, PIP_FIND_LINKS or pip's own configuration."""
    for var in ("MOE_SHIMS_FIND_LINKS", "PIP_FIND_LINKS"):
        if os.environ.get(var):
            return os.environ[var].split()
    return list(dict.fromkeys(_pip_config_values("find-links")))


def _pip_config_values(*keys: str) -> list[str]:
    """The values (whitespace-separated) of every pip configuration entry whose key ends in one of ``keys``."""
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    values = []
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip().rsplit(".", 1)[-1] in keys:
            values.extend(value.strip().strip("'\"").split())
    return values


def local_index_folders() -> list[str]:
    """The folders that the local (file://) package indexes named in pip's configuration (index-url,
    extra-index-url) keep their files in, read from the indexes' own PEP 503 pages: on this machine kind, where
    the CUDA builds of newer torch releases and their nvidia / triton wheels lie. MOE_SHIMS_FIND_LINKS replaces
    them as it replaces :func:`find_links`."""
    import urllib.parse
    from pathlib import Path

    if os.environ.get("MOE_SHIMS_FIND_LINKS"):
        return []
    folders = []
    for url in _pip_config_values("index-url", "extra-index-url"):
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme != "file":
            continue
        for page in sorted(Path(urllib.parse.unquote(parsed.path)).glob("*/index.html")):
            for href in re.findall(r'href="([^"#]+)', page.read_text(encoding="utf-8", errors="replace")):
                target = page.parent / urllib.parse.unquote(href)
                if target.is_file():
                    folders.append(str(target.resolve().parent))
    return list(dict.fromkeys(folders))


def wheel_folders(cell: Cell) -> list[str]:
    """Where uv looks for local wheels besides the index: :func:`find_links`, and for a cell that pins its own torch
    (a lane's ``torch``) also :func:`local_index_folders`, where such a torch and its dependencies lie locally
    (otherwise uv would download them: the CUDA build of torch 2.14.1 with its nvidia wheels is ~2.8 GB)."""
    return list(dict.fromkeys(find_links() + (local_index_folders() if cell.torch else [])))


def requirements(cell: Cell, environment: dict) -> list[str]:
    # MOE_SHIMS_TORCH replaces [environment]'s pin; a lane that pins its own torch keeps it (the lane exists to test
    # that release: a CI-wide override such as the CPU build of the default torch must not turn it into another lane)
    torch_req = pin("torch", cell.torch) if cell.torch else (
        os.environ.get("MOE_SHIMS_TORCH") or pin("torch", environment["torch"]))
    extra = [pin("bitsandbytes", environment["bitsandbytes"])]
    extra += [pin(p, getattr(cell, p) or environment[p]) for p in SUPPORT_PACKAGES]
    return [torch_req, *cell.requirements(), *extra]


def exclude_newer(cell: Cell, environment: dict) -> str | None:
    """The index date a fixed release lane resolves its unpinned dependencies at (None: the cell floats)."""
    return environment.get("fixed_index_date") if cell.fixed else None


def uv_executable() -> str:
    found = shutil.which("uv")
    if found:
        return found
    try:
        from uv import find_uv_bin  # the PyPI "uv" package ships the binary
    except ImportError as exc:
        raise InstallError("install_failed", "uv is not installed (pip install uv)") from exc
    return find_uv_bin()


def ensure_venv(location, python_version: str) -> str:
    """The interpreter of the uv venv at ``location``, created (for ``python_version``) if it is not there yet."""
    from pathlib import Path

    python = Path(location) / "bin" / "python"
    if not python.exists():
        subprocess.run([uv_executable(), "venv", "-q", "-p", python_version, str(location)], check=True)
    return str(python)


def install(python: str, cell: Cell, environment: dict, timeout_s: float, extra: tuple[str, ...] = ()) -> dict:
    """Install the cell's requirements (and ``extra`` ones, resolved together) into the venv of ``python``; return
    what was asked and how long it took."""
    reqs = [*requirements(cell, environment), *extra]
    cmd = [uv_executable(), "pip", "install", "--python", python]
    for folder in wheel_folders(cell):
        cmd += ["--find-links", folder]
    date = exclude_newer(cell, environment)
    if date:
        cmd += ["--exclude-newer", date]
    cmd += reqs
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise InstallError("install_failed", f"uv pip install timed out after {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        message = _clean(proc.stderr or proc.stdout)
        status = "unresolvable" if any(m in message for m in UNRESOLVABLE_MARKERS) else "install_failed"
        raise InstallError(status, message)
    return {"requirements": reqs, "find_links": wheel_folders(cell), "exclude_newer": date,
            "seconds": round(time.monotonic() - start, 1)}


def uninstall(python: str, packages, timeout_s: float) -> list[str]:
    """Remove ``packages`` from the venv of ``python`` (those not installed are no error); returns what was asked."""
    packages = list(packages)
    if packages:
        proc = subprocess.run([uv_executable(), "pip", "uninstall", "--python", python, *packages],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        if proc.returncode != 0:
            raise InstallError("install_failed", f"uv pip uninstall {' '.join(packages)}: "
                                                 f"{_clean(proc.stderr or proc.stdout)}")
    return packages


def _clean(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
