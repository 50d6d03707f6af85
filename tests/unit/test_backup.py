"""The pieces of shared/backup.py that need no server: the manifest's checks and the password
kept off the command line (the rest is tests/fault/test_backup_restore.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from shared.backup import FORMAT, MANIFEST, Backup, BackupError, _libpq


def _backup(tmp_path: Path) -> Path:
    (tmp_path / "postgres.dump").write_bytes(b"dump")
    files = {
        "postgres.dump": {"bytes": 4, "sha256": hashlib.sha256(b"dump").hexdigest()},
    }
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}))
    return tmp_path


def test_a_backup_whose_files_match_the_manifest_verifies(tmp_path: Path) -> None:
    Backup.read(_backup(tmp_path)).verify()


def test_a_changed_or_missing_file_is_refused_with_its_name(tmp_path: Path) -> None:
    path = _backup(tmp_path)
    (path / "postgres.dump").write_bytes(b"dumq")
    with pytest.raises(BackupError, match=r"postgres\.dump does not match its checksum"):
        Backup.read(path).verify()
    (path / "postgres.dump").unlink()
    with pytest.raises(BackupError, match=r"postgres\.dump is missing"):
        Backup.read(path).verify()


def test_a_directory_without_a_manifest_or_of_another_format_is_not_a_backup(
    tmp_path: Path,
) -> None:
    with pytest.raises(BackupError, match="not a backup"):
        Backup.read(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": FORMAT + 1}))
    with pytest.raises(BackupError, match="format"):
        Backup.read(tmp_path)


def test_the_database_password_goes_in_the_environment_not_on_the_command_line() -> None:
    url, env = _libpq("postgresql://post:s%40cret@db.example:5432/post?sslmode=verify-full")
    assert url == "postgresql://post@db.example:5432/post?sslmode=verify-full"
    assert env["PGPASSWORD"] == "s@cret"
    plain, _ = _libpq("postgresql://postgres@127.0.0.1:5432/post")
    assert plain == "postgresql://postgres@127.0.0.1:5432/post"
