"""pretrain.py end to end on a tiny config: resume is exact, and torchrun DDP (gloo, 2 processes) runs."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--max_iters=6",
        "--eval_interval=3", "--eval_iters=1", "--n_samples=0", "--warmup_iters=2"]


def run(args, out, launcher=(sys.executable,)):
    r = subprocess.run([*launcher, "pretrain.py", f"--out_dir={out}", *TINY, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return [json.loads(line) for line in open(os.path.join(out, "pretrain.jsonl"))]


def test_resume_continues_with_the_same_losses(tmp_path):
    full = run([], tmp_path / "a")
    part = run(["--stop_at=3"], tmp_path / "b")  # as if killed after the step-3 checkpoint
    assert [r["iter"] for r in part] == [1, 2, 3]
    assert torch.load(tmp_path / "b" / "base.pt", weights_only=True)["step"] == 3
    resumed = run(["--resume=True"], tmp_path / "b")
    assert [r["iter"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(full, resumed):  # same batches, same weights, same optimizer state: same losses
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    assert full[-1]["val_loss"] == pytest.approx(resumed[-1]["val_loss"], abs=1e-6)


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not installed")
def test_torchrun_two_processes_on_cpu(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = (torchrun if os.path.exists(torchrun) else "torchrun", "--standalone", "--nproc_per_node=2")
    log = run([], tmp_path, launcher)
    assert [r["iter"] for r in log] == [1, 2, 3, 4, 5, 6]  # only rank 0 logs
    assert log[-1]["tokens"] == 6 * 2 * 4 * 32  # both ranks' batches count
    ck = torch.load(tmp_path / "base.pt", weights_only=True)
    assert ck["kind"] == "base" and ck["step"] == 6
