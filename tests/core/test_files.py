"""Atomic, durable file replacement: old or new content, never part; no temporary file left
behind, whether the write succeeds or fails; concurrent writers (threads, processes) leave
one complete version."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from core.files import atomic_path, atomic_write, replace_durably

REPO = Path(__file__).resolve().parents[2]
SIZE = 256 * 1024  # several write calls and pages: a torn write would show


def payload(writer: int, version: int) -> bytes:
    """A version whose every byte is known from its first line: a partial or mixed read
    never equals the payload its header names."""
    return f"{writer} {version}\n".encode() + bytes([65 + writer % 26]) * SIZE


def is_complete(data: bytes) -> bool:
    header = data.split(b"\n", 1)[0].split()
    return len(header) == 2 and data == payload(int(header[0]), int(header[1]))


def test_a_write_replaces_the_target_and_leaves_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "entry.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new")

    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["entry.json"]


def test_the_temporary_file_is_hidden_beside_the_target_and_unique(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first.parent == second.parent == tmp_path
        assert first.name.startswith(".blob.bin.") and first.name.endswith(".tmp")
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert target.read_bytes() == b"1"  # the last block to end wins, whole
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_a_write_cut_short_by_the_disk_keeps_the_old_content_and_no_temporary(
    tmp_path: Path,
) -> None:
    # a real failure in the middle of the data, as a full disk gives, that root cannot
    # override: the file-size limit (EFBIG) in a process of its own
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    code = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from core.files import atomic_write\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "try:\n"
        "    atomic_write(Path(sys.argv[1]), b'n' * 1_000_000)\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(target)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)

    assert done.stdout.strip() == str(errno.EFBIG), done.stderr
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


class FailingSource:
    """A readable stream that breaks after ``good`` bytes, as a dropped download does."""

    def __init__(self, good: int) -> None:
        self._left = good

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            raise ConnectionResetError("the source went away")
        chunk = min(self._left, 4096 if size < 0 else size)
        self._left -= chunk
        return b"x" * chunk


def test_a_writer_that_fails_mid_copy_keeps_the_old_content_and_no_temporary(
    tmp_path: Path,
) -> None:
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")

    with pytest.raises(ConnectionResetError), atomic_path(target) as temporary, \
            temporary.open("wb") as out:
        shutil.copyfileobj(FailingSource(100_000), out)

    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["weights.safetensors"]


def test_a_rename_that_fails_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a directory cannot be replaced by a file

    with pytest.raises(OSError):
        atomic_write(target, b"new")

    assert (target / "inside").is_dir()
    assert os.listdir(tmp_path) == ["taken"]


def test_a_block_that_writes_nothing_leaves_the_target_as_it_was(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    with atomic_path(target):
        pass  # a download that found nothing
    assert not target.exists()

    target.write_bytes(b"old")
    with atomic_path(target):
        pass
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_a_hard_link_to_the_target_itself_leaves_no_temporary(tmp_path: Path) -> None:
    # renaming a link onto its own file does nothing: the temporary must still go
    target = tmp_path / "00.png"
    target.write_bytes(b"image")
    with atomic_path(target) as temporary:
        os.link(target, temporary)
    assert target.read_bytes() == b"image"
    assert os.listdir(tmp_path) == ["00.png"]


def test_replace_durably_moves_a_complete_file_onto_the_target(tmp_path: Path) -> None:
    temporary = tmp_path / ".tmp-made-by-its-writer"
    temporary.write_bytes(b"new")
    (tmp_path / "out.png").write_bytes(b"old")

    replace_durably(temporary, tmp_path / "out.png")

    assert (tmp_path / "out.png").read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.png"]


def test_threads_writing_one_target_leave_one_complete_version(tmp_path: Path) -> None:
    target = tmp_path / "shared.json"
    atomic_write(target, payload(0, 0))
    writers, versions = 6, 15
    start = threading.Barrier(writers + 1)
    done = threading.Event()
    torn: list[bytes] = []
    reads = 0

    def write(writer: int) -> None:
        start.wait(timeout=30)
        for version in range(1, versions + 1):
            atomic_write(target, payload(writer, version))

    def read() -> None:
        nonlocal reads
        start.wait(timeout=30)
        while not done.is_set():
            data = target.read_bytes()
            reads += 1
            if not is_complete(data):
                torn.append(data[:40])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(1, writers + 1)]
    reader = threading.Thread(target=read)
    for thread in (*threads, reader):
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    done.set()
    reader.join(timeout=60)

    assert torn == [] and reads > 0
    final = target.read_bytes()
    assert is_complete(final) and final.split(b"\n", 1)[0].split()[1] == str(versions).encode()
    assert os.listdir(tmp_path) == ["shared.json"]


WRITER = (
    "import sys\n"
    "from pathlib import Path\n"
    "from core.files import atomic_write\n"
    "from tests.core.test_files import payload\n"
    "writer, versions = int(sys.argv[2]), int(sys.argv[3])\n"
    "for version in range(1, versions + 1):\n"
    "    atomic_write(Path(sys.argv[1]), payload(writer, version))\n"
)


def test_processes_writing_one_target_leave_one_complete_version(tmp_path: Path) -> None:
    # as instances of a fleet sharing a folder: each its own process, none coordinating
    target = tmp_path / "shared.bin"
    atomic_write(target, payload(0, 0))
    versions = 15
    processes = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(w),
                                   str(versions)], cwd=REPO, stderr=subprocess.PIPE)
                 for w in range(1, 5)]
    torn, reads = [], 0
    while any(process.poll() is None for process in processes):
        data = target.read_bytes()
        reads += 1
        if not is_complete(data):
            torn.append(data[:40])
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr.decode()

    assert torn == [] and reads > 0
    final = target.read_bytes()
    assert is_complete(final) and final.split(b"\n", 1)[0].split()[1] == str(versions).encode()
    assert os.listdir(tmp_path) == ["shared.bin"]
