"""COMPILE_CACHE=shared: a new instance of the fleet finds the kernels the first one compiled.

Two instances, each in a process of its own with an empty torch compile cache (as two pods),
an output folder of its own, and one shared store (a real S3 server on 127.0.0.1). The
first compiles every kernel in its warm-up and leaves them in the store; the second's
warm-up compiles none (every kernel found in the first's blob) and its images are the same
pixels. A blob torch cannot read is a warning, never a failed start: compiled again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.image.compile_cache import CompileCache
from tests.support.s3_server import S3Server, StoreLocation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]


def instance(model: Path, tmp_path: Path, name: str, store: StoreLocation | None
             ) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}")}
    if store is not None:
        env.update(STORAGE_URL=store.url, STORAGE_ENDPOINT_URL=store.endpoint,
                   COMPILE_CACHE="shared")
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.warm_instance", str(model),
         str(tmp_path / f"outputs-{name}")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=500, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    report["log"] = done.stderr
    return report


def blobs(folder: Path) -> list[Path]:
    return sorted((folder / ".compile-cache").glob("*.bin"))


def test_a_second_instance_compiles_nothing_with_the_first_ones_kernels_from_the_store(
    dev_model_dir: Path, tmp_path: Path, s3_store: StoreLocation, s3_server: S3Server,
) -> None:
    first = instance(dev_model_dir, tmp_path, "a", s3_store)
    assert first["misses"] > 0 and first["hits"] == 0  # an empty cache: all compiled
    (blob,) = blobs(tmp_path / "outputs-a")
    prefix = s3_store.url.removeprefix(f"s3://{s3_server.bucket}/")
    assert s3_server.object(f"{prefix}/compile-cache/{blob.name}") == blob.read_bytes()

    second = instance(dev_model_dir, tmp_path, "b", s3_store)
    assert second["misses"] == 0 and second["hits"] == first["misses"], second["log"][-2000:]
    assert second["pixels"] == first["pixels"]
    assert [path.name for path in blobs(tmp_path / "outputs-b")] == [blob.name]  # kept here
    assert f"from {s3_store.url}/compile-cache/{blob.name}" in second["log"]


def test_a_blob_torch_cannot_read_is_a_warning_and_the_instance_compiles(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    folder = tmp_path / ".compile-cache"
    folder.mkdir()
    (folder / "x.bin").write_bytes(b"not torch's artifacts")
    loaded = CompileCache("x.bin", folder).load()
    assert loaded.source is None
    assert "was not loaded" in caplog.text and "compiling from scratch" in caplog.text
