import os
import subprocess
import sys
from pathlib import Path

import pytest
from alchemist_protocol.schemas import ArtifactKind, VersionInfo
from alchemist_worker.versions.directory import (
    MANIFEST,
    TrainedFeedback,
    VersionDirectory,
    VersionExists,
    VersionManifest,
)


def manifest(version: int) -> VersionManifest:
    return VersionManifest(
        info=VersionInfo(version=version, parent=version - 1, kind=ArtifactKind.LORA, path=""),
        feedback=[TrainedFeedback(feedback_id=f"f{version}", entry_ids=[f"{version}-0"], label="positive")],
    )


def publish(directory: VersionDirectory, version: int, payload: bytes = b"w") -> Path:
    staged = directory.stage(version)
    (staged.path / "adapter_model.safetensors").write_bytes(payload)
    return directory.commit(staged, manifest(version))


def test_commit_makes_a_complete_version_visible(tmp_path: Path) -> None:
    d = VersionDirectory(tmp_path)
    assert d.latest() == 0
    staged = d.stage(1)
    (staged.path / "adapter_model.safetensors").write_bytes(b"abc")
    assert d.committed() == []  # staging is invisible
    target = d.commit(staged, manifest(1))
    assert d.committed() == [1] and d.latest() == 1
    m = d.manifest(1)
    assert m.info.path == str(target) and m.files == ["adapter_model.safetensors"]
    assert m.feedback[0].feedback_id == "f1"
    assert not staged.path.exists()


def test_second_writer_of_a_version_loses(tmp_path: Path) -> None:
    d = VersionDirectory(tmp_path)
    a, b = d.stage(1), d.stage(1)
    d.commit(a, manifest(1))
    with pytest.raises(VersionExists):
        d.commit(b, manifest(1))
    assert d.committed() == [1] and not b.path.exists()


def test_prune_keeps_the_newest_and_protected(tmp_path: Path) -> None:
    d = VersionDirectory(tmp_path)
    for v in range(1, 7):
        publish(d, v)
    assert d.prune(keep=3, protect={2}) == [1, 3]
    assert d.committed() == [2, 4, 5, 6]
    with pytest.raises(FileNotFoundError, match="kept"):
        d.manifest(1)


def test_leftovers_of_a_killed_writer_are_cleaned(tmp_path: Path) -> None:
    # A real process stages a version and is killed with SIGKILL before committing.
    code = (
        "import os, sys, signal; from pathlib import Path;"
        "from alchemist_worker.versions.directory import VersionDirectory;"
        "d = VersionDirectory(Path(sys.argv[1])); s = d.stage(1);"
        "(s.path / 'adapter_model.safetensors').write_bytes(b'half');"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert proc.returncode == -9
    d = VersionDirectory(tmp_path)
    assert d.committed() == []
    leftovers = d.clean_leftovers()
    assert len(leftovers) == 1 and leftovers[0].startswith(".staging-v000001")
    assert os.listdir(tmp_path) == []


def test_a_directory_without_manifest_is_not_a_version(tmp_path: Path) -> None:
    d = VersionDirectory(tmp_path)
    publish(d, 1)
    (tmp_path / "v000002").mkdir()  # e.g. copied by hand, incomplete
    assert d.committed() == [1]
    assert (tmp_path / "v000001" / MANIFEST).is_file()
