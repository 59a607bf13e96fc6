"""benchmarks/gpu_check.py's CPU mode, so the GPU check cannot rot between GPU runs.

The same flow as on CUDA (tiny Llama by code, 4-bit NF4 base, trl SFT with paged_adamw_8bit,
adapter reload, float32 reference), shortened; what only CUDA has (the device, paging, the
CUDA-vs-CPU comparison) is a SKIP. No vLLM engine: no `integration` marker.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def test_gpu_check_cpu_mode_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "12", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,  # the script finds trainer/ from its own path, not the working folder
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    result = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in result["checks"]}
    assert status == {
        "cuda": "SKIP",
        "base_4bit": "PASS",
        "loss": "PASS",
        "optimizer_8bit": "PASS",
        "optimizer_paged": "SKIP",
        "adapter_load": "PASS",
        "cuda_vs_cpu": "SKIP",
        "qlora_vs_fp32": "PASS",
        "time": "SKIP",  # the 10-minute budget is checked on CUDA only
    }, run.stdout[-4000:]
    loss = next(c for c in result["checks"] if c["name"] == "loss")
    assert "trl 12 steps" in loss["detail"]  # trl's SFTTrainer, as trainer/run.py trains
    assert "FAIL" not in run.stdout
