"""The GPU check (benchmarks/gpu_check.sh) in its CPU setting: every item runs and records its figures."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CUDA_ONLY = {"host_syncs"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--tiny"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu_check.json").read_text())


def test_every_item_runs_on_the_cpu_except_the_cuda_only_ones(report):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    _, result = report
    assert list(result["items"]) == list(module.ITEMS)
    for name, item in result["items"].items():
        assert item["status"] == ("skipped" if name in CUDA_ONLY else "ok"), (name, item.get("error"))
    assert result["machine"]["device"] == "cpu" and result["settings"]["tiny"] is True


def test_the_check_records_the_fixes_it_exists_to_prove(report):
    _, result = report
    items = result["items"]
    # Bitwise by design: the resumed and the uninterrupted run execute the same float32 kernels on one machine
    # in one process order (seeded data order, restored optimizer and RNG states).
    assert items["resume_after_stop"]["cases"]["fp32"]["max_weight_diff_vs_uninterrupted"] == 0.0
    assert items["resume_after_stop"]["cases"]["fp32_then_fp16"]["amp"] == "float16"
    precision = items["attack_precision"]["by_dtype"]
    # A threshold, not zero: an AMD EPYC's float16 kernels leave ~1e-4 of gradients at zero; unscaled ~10%+.
    assert precision["float16"]["zero_gradient_fraction"] < 1e-3
    assert precision["float16_unscaled"]["zero_gradient_fraction"] > 0.1  # what the rescaling prevents
    assert all(p["contiguous"] for p in items["projections"]["projections"].values())
    group = items["process_group"]
    assert group["admm_noncontiguous"] == 0 and group["admm_broadcast_tensors"] > 0 and group["ddp_losses_finite"]
    assert items["latency_batch1"]["results"]["decomposed compiled"]["median_ms"] > 0
    assert items["cli_end_to_end"]["compress"]["reloaded_on"] == "cpu"
    assert {"dense", "cstar-4x", "magnitude-4x"} == set(items["cli_end_to_end"]["compare"]["accuracy"])


def test_the_table_names_every_item(report):
    out, result = report
    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in result["items"])


def test_without_an_output_folder_the_usage_is_printed(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("usage: bash benchmarks/gpu_check.sh OUT_DIR")
