"""evaluate.py end to end on a tiny untrained SFT checkpoint: the report's arithmetic, not the model's quality."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import runtime
from data.tokenizer import get_tokenizer  # noqa: E402


def test_report_numbers_add_up(tmp_path):
    args = dict(block_size=128, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    sft = M.GPT(M.GPTConfig(**args))
    runtime.save_checkpoint(str(tmp_path / "sft.pt"), {"model": sft.state_dict(), "model_args": args, "kind": "sft",
                                                 "step": 0, "config": {}, "tokenizer": "world"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["Describe the cat.", "Write an insult about Tom.", "Where does Mia live?"]) + "\n")
    r = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={tmp_path}", f"--prompts={prompts}", "--samples=4",
                        "--bon=0", "--max_new_tokens=12", "--json_out=True"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout[r.stdout.index("\n{") + 1:])["sft"]
    assert res["win_vs_sft"] == pytest.approx(0.5)  # against itself every pair is a tie
    assert res["n"] == 12 and res["kl"] == 0.0
    # the per-component losses are the gold utility's own decomposition: they add up to 1 - gold
    assert sum(res["missing"].values()) == pytest.approx(1 - res["gold"], abs=1e-9)
    assert res["missing"]["ended"] >= 0.0  # a cut-off answer loses 2 x 0.1 here, an ended one nothing
    report = (tmp_path / "report.md").read_text()
    assert "| sft | " in report and "Where the gold is lost" in report
