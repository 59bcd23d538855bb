"""DDP on CPU (gloo, 2 processes): identical encodings on both ranks, one export."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_ddp_ranks_hold_identical_encodings_and_export_once(tmp_path):
    script = Path(__file__).with_name("ddp_script.py")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "encodings_rank0.pt")
    rank1 = torch.load(tmp_path / "encodings_rank1.pt")
    assert rank0.keys() == rank1.keys() and rank0
    for name in rank0:
        assert torch.equal(rank0[name][0], rank1[name][0]), name
        assert torch.equal(rank0[name][1], rank1[name][1]), name
    exported = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert exported == ["README.md", "model_int.onnx", "native"]
