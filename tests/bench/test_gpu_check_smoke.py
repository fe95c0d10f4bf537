"""``bench/gpu_check.py --smoke``: the GPU check's own code, run on the CPU with the
development model's sizes, so that the script `make gpu-check` runs cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_the_smoke_run_prints_every_table_with_figures(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=560, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    for header in (("| configuration | s/image | × vs first | warm-up s | peak GiB "
                    "| PSNR dB vs eager | max abs diff |"),
                   "| attention kernel at 64² | ms per call | chosen by auto |",
                   "| LoRA switch | switches | mean ms | recompilations |",
                   "| training step | s/step | peak GiB |"):
        assert header in text
    report = json.loads(out.read_text())
    timed = {row["config"]: row for row in report["images"] if "median_s" in row}
    fast = "compiled fast path, LoRA at 0.8"
    assert set(timed) == {"eager", fast, "compiled fast path + step cache mag, LoRA at 0.8",
                          "compiled fast path + step cache taylorseer, LoRA at 0.8",
                          "step cache taylorseer", "step cache first_block", "step cache mag",
                          "compiled (hotswap slot), unfused, native attention",
                          }, report["images"]
    assert all(row["median_s"] > 0 and len(row["times_s"]) == 2 for row in timed.values())
    # every row's pixels against eager's, on the same seeds and weights (at the row's scale)
    assert timed["eager"]["psnr_db"] is None and timed["eager"]["max_abs_diff"] == 0
    for cache in ("taylorseer", "first_block", "mag"):
        assert {"psnr_db", "max_abs_diff"} <= timed[f"step cache {cache}"].keys()
    # taylorseer predicts one step in five whatever the image: other pixels, measured
    taylor = timed["step cache taylorseer"]
    assert taylor["max_abs_diff"] > 0 and taylor["psnr_db"] is not None
    assert 0 < taylor["psnr_db"] < 200
    # the fast path (fused QKV, a LoRA at 0.8) and the plain compiled model: float noise
    for label in (fast, "compiled (hotswap slot), unfused, native attention"):
        row = timed[label]
        assert row["max_abs_diff"] is not None and row["max_abs_diff"] <= 2, row
    assert timed[fast]["lora_scale"] == 0.8
    # a step cache on the compiled blocks: the eager model's pixels with the same cache
    for cache in ("mag", "taylorseer"):
        on_compiled, eager_cache = (timed[f"compiled fast path + step cache {cache}, LoRA at 0.8"],
                                    timed[f"step cache {cache}"])
        assert abs(on_compiled["max_abs_diff"] - eager_cache["max_abs_diff"]) <= 2, cache
    fp8 = next(row for row in report["images"] if row["config"].startswith("fp8"))
    assert "needs CUDA" in fp8["skipped"]  # said, not silently left out
    kernels = {row["backend"]: row for row in report["attention"]}
    assert kernels["native"]["ms"] > 0 and kernels["native"]["auto"]  # the CPU's choice
    assert "unavailable" in kernels["_native_cudnn"]  # a CUDA kernel: said, not hidden
    switches = {row["mode"]: row for row in report["lora_switch"]}
    assert switches["eager (LRU set)"]["switches"] == 6
    assert switches["compiled hotswap"]["recompilations"] == 0  # hotswap: no recompilation
    # training on the model serve runs (compiled, fused) and on the eager one
    assert [(row["config"], row["size"]) for row in report["training"]] == [
        ("compiled fast path", 64), ("eager", 64), ("eager", 128)]
    assert all(row["seconds_per_step"] > 0 and row["finite_loss"]
               for row in report["training"])
