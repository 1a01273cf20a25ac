"""evaluate.py end to end on a tiny untrained SFT checkpoint: the report's arithmetic, not the model's
quality."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import runtime
from data import world  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402
from test_reliability import time_split  # noqa: E402
from test_dpo import save_online_inputs  # noqa: E402
from conftest import run_here  # noqa: E402


def test_report_numbers_add_up(tmp_path):
    args = dict(block_size=128, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    sft = M.GPT(M.GPTConfig(**args))
    runtime.save_checkpoint(str(tmp_path / "sft.pt"),
                            {"model": sft.state_dict(), "model_args": args, "kind": "sft", "step": 0,
                             "config": {}, "tokenizer": "world"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["Describe the cat.", "Write an insult about Tom.",
                                  "Where does Mia live?"]) + "\n")
    r = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={tmp_path}", f"--prompts={prompts}",
                        "--samples=4", "--bon=0", "--max_new_tokens=12", "--json_out=True"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout[r.stdout.index("\n{") + 1:])["sft"]
    assert f"and 0 figures in {tmp_path / 'figures'}" in r.stdout  # no sweep and no logs here: none drawn
    head = (tmp_path / "report.md").read_text().splitlines()[2]  # the user's prompts are not held-out ones
    assert head.startswith(f"3 prompts from {prompts} (the hidden human knows the world"), head
    assert res["win_vs_sft"] == pytest.approx(0.5)  # against itself every pair is a tie
    assert res["n"] == 12 and res["kl"] == 0.0
    # the per-component losses are the gold utility's own decomposition: they add up to 1 - gold
    assert sum(res["missing"].values()) == pytest.approx(1 - res["gold"], abs=1e-9)
    # a cut-off answer loses 2 x 0.1 here (its turn-end component is -1), an ended one nothing
    assert res["missing"]["ended"] == pytest.approx(0.2 * (1 - res["ended"]))
    report = (tmp_path / "report.md").read_text()
    assert "| sft | " in report and "Where the gold is lost" in report
    assert {"sampling", "scoring", "hidden human"} <= set(time_split(r.stdout, "evaluate"))


def test_an_sft_row_in_ckpt_is_the_reference_every_row_meets(tmp_path):
    """--ckpt=sft=PATH compares every row with PATH, not with out_dir/sft.pt (which it once silently used)."""
    args = dict(block_size=128, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2, n_embd=32)
    for i, d in enumerate(("out", "other")):
        torch.manual_seed(i)
        net = M.GPT(M.GPTConfig(**args))
        if d == "other":  # large token embeddings (tied to the output): far from the near-uniform "out"
            torch.nn.init.normal_(net.transformer.wte.weight, std=1.0)
        (tmp_path / d).mkdir()
        runtime.save_checkpoint(str(tmp_path / d / "sft.pt"),
                                {"model": net.state_dict(), "model_args": args, "kind": "sft", "step": 0,
                                 "config": {}, "tokenizer": "world"})
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Describe the cat."}) + "\n")
    r = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={tmp_path / 'out'}",
                        f"--prompts={prompts}",
                        f"--ckpt=sft={tmp_path / 'other' / 'sft.pt'},mine={tmp_path / 'out' / 'sft.pt'}",
                        "--samples=4", "--bon=0", "--max_new_tokens=8", "--json_out=True"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout[r.stdout.index("\n{") + 1:])
    assert res["sft"]["kl"] == 0.0
    assert res["mine"]["kl"] > 0.1  # out_dir's own sft.pt is far from the reference


def test_a_twin_of_sft_draws_its_own_answers_not_sfts(tmp_path, monkeypatch):
    """The win rate compares two independent answers: a row with SFT's very weights must not share the SFT
    row's random stream (inverse-CDF sampling would give it SFT's answers, every pair a tie)."""
    import evaluate
    args = dict(block_size=64, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    path = str(tmp_path / "sft.pt")
    runtime.save_checkpoint(path, {"model": M.GPT(M.GPTConfig(**args)).state_dict(), "model_args": args,
                                   "kind": "sft", "step": 0, "config": {}, "tokenizer": "world"})
    for name, value in (("samples", 4), ("max_new_tokens", 8), ("bon", 0)):
        monkeypatch.setattr(evaluate, name, value)
    monkeypatch.setattr(world, "gold", lambda p, text, ended: len(text) % 5 / 5)  # a random net: no ties
    rt = runtime.setup("cpu", "float32", 0)
    prompts = [[{"role": "user", "content": f"Describe the {x}."}] for x in ("cat", "dog")]
    res = evaluate.evaluate(rt, {"sft": path, "twin": path}, prompts, str(tmp_path / "no_reward.pt"))
    texts = {n: [s["text"] for s in res[n]["samples"]] for n in ("sft", "twin")}
    assert texts["sft"] != texts["twin"]
    assert res["twin"]["kl"] == pytest.approx(0.0, abs=1e-5)  # the same network: the stream differs, not pi
    # its win rate pairs each of its answers with SFT's answer to the same prompt, counted by hand here
    golds = [(a["gold"], b["gold"]) for a, b in zip(res["twin"]["samples"], res["sft"]["samples"])]
    wins = [1.0 if a > b + 1e-9 else 0.0 if b > a + 1e-9 else 0.5 for a, b in golds]
    p = sum(wins) / len(wins)
    assert len(golds) == 8 and res["twin"]["win_vs_sft"] == pytest.approx(p)
    # its interval treats the 4 answers to a prompt as one cluster: 2 prompts, variance 2 x sum of squared
    # per-prompt residual sums / 8^2
    sums = [sum(o - p for o, s in zip(wins, res["twin"]["samples"]) if s["prompt"] == q) for q in prompts]
    assert res["twin"]["win_ci"] == pytest.approx(1.96 * (2 * sum(r * r for r in sums) / 64) ** 0.5)


def test_gold_at_equal_kl_is_read_off_the_frontier():
    import evaluate
    pts = [(2.0, 0.9), (0.5, 0.75), (1.0, 0.8)]  # any order
    assert evaluate.gold_at_kl(pts, 0.5) == pytest.approx(0.75)
    assert evaluate.gold_at_kl(pts, 1.5) == pytest.approx(0.85)  # halfway between (1, 0.8) and (2, 0.9)
    # not extrapolated
    assert evaluate.gold_at_kl(pts, 0.25) is None and evaluate.gold_at_kl(pts, 2.5) is None
    assert evaluate.gold_at_kl([(1.0, 0.8)], 1.0) == 0.8 and evaluate.gold_at_kl([(1.0, 0.8)], 1.5) is None


def test_the_frontier_has_every_method_and_its_default_run(tmp_path, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    (tmp_path / "sweep").mkdir()
    sweep = [{"stage": s, "beta": 0.1, "gold": g, "kl": kl, "setup": evaluate.sampling_setup()}
             for s, g, kl in (("ppo", 0.80, 1.0), ("dpo", 0.85, 2.0), ("grpo", 0.7, 0.5), ("rloo", 0.9, 3.0))]
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(sweep))
    results = {"sft": {"gold": 0.7, "kl": 0.0}, "ppo": {"gold": 0.9, "kl": 2.0},
               "bon": {"gold": 0.88, "kl": 1.8}}
    lines = evaluate.draw_figures(results, str(tmp_path / "figures"))
    svg = (tmp_path / "figures" / "frontier.svg").read_text()
    assert all(f">{name}</text>" in svg for name in ("PPO", "DPO", "GRPO", "RLOO", "SFT"))  # the legend
    assert "- ppo default: gold 0.900, KL 2.00" in lines
    # PPO's frontier is its sweep run (1.0, 0.80) and its default run (2.0, 0.90): at KL 1.5, 0.85; the
    # other methods have one run each, so only their own KL has a value
    assert "| 1.5 | 0.850 |  |  |  |" in lines and "| 2 | 0.900 | 0.850 |  |  |" in lines
    assert "best-of-16 (KL bound)" in svg  # drawn at ln N - (N-1)/N, an upper bound, not a measured KL


@pytest.mark.parametrize("differs", [("prompts", "mine.jsonl"), ("samples", 2), ("temperature", 0.7),
                                     ("ckpt", "x/sft.pt,y/ppo.pt"), ("legacy", None)])
def test_rows_measured_unlike_the_sweep_stay_off_its_frontier(tmp_path, monkeypatch, differs):
    """A frontier point is a (KL, gold) pair of one evaluation: this report's rows join the sweep's only if
    they are the default runs answering the same prompts with the same sampling (or the sweep's file says
    nothing of how it was measured: a sweep written before it did)."""
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    (tmp_path / "sweep").mkdir()
    sweep = [{"stage": "ppo", "beta": 0.1, "gold": 0.8, "kl": 1.0, "setup": evaluate.sampling_setup()},
             {"stage": "ppo", "beta": 0.2, "gold": 0.85, "kl": 0.5, "setup": evaluate.sampling_setup()}]
    name, value = differs
    if name == "legacy":
        sweep = [{k: v for k, v in r.items() if k != "setup"} for r in sweep]
    else:
        monkeypatch.setattr(evaluate, name, value)
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(sweep))
    results = {"sft": {"gold": 0.7, "kl": 0.0}, "ppo": {"gold": 0.5, "kl": 2.0}}
    lines = evaluate.draw_figures(results, str(tmp_path / "figures"))
    assert not any(line.startswith("- ppo default") for line in lines)
    assert "| 2 |  |" in lines and "| 0.5 | 0.850 |" in lines  # PPO's frontier: the sweep's two runs only
    assert any("not drawn here" in line for line in lines)
    assert ">SFT</text>" not in (tmp_path / "figures" / "frontier.svg").read_text()  # no legend entry


def test_the_equal_kl_table_has_the_kl_every_method_covers(tmp_path, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    (tmp_path / "sweep").mkdir()
    sweep = [{"stage": "ppo", "beta": 0.1, "gold": 0.8, "kl": 1.0, "setup": evaluate.sampling_setup()},
             {"stage": "dpo", "beta": 0.1, "gold": 0.7, "kl": 0.6, "setup": evaluate.sampling_setup()}]
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(sweep))
    results = {"sft": {"gold": 0.6, "kl": 0.0}, "ppo": {"gold": 0.9, "kl": 1.4},
               "dpo": {"gold": 0.8, "kl": 1.6}}
    lines = evaluate.draw_figures(results, str(tmp_path / "figures"))
    # PPO covers KL 1.0-1.4, DPO 0.6-1.6: both at 1.2, halfway through PPO's segment, 0.6 of the way in DPO's
    assert "| 1.2 | 0.850 | 0.760 |" in lines and "| 1.5 |  | 0.790 |" in lines


def test_a_method_with_one_point_has_its_gold_in_the_row_every_method_covers(tmp_path, monkeypatch):
    """The KL every method covers was rounded to 0.01 before the lookup: a one-point frontier (a method with
    one sweep beta and no default run evaluated) lies only at its own KL: its cell in that row was blank."""
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    (tmp_path / "sweep").mkdir()
    sweep = [{"stage": "dpo", "beta": 0.5, "gold": 0.25, "kl": 0.00157, "setup": "another"}]
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(sweep))
    lines = evaluate.draw_figures({"sft": {"gold": 0.6, "kl": 0.0}}, str(tmp_path / "figures"))
    assert "| 0.00157 | 0.250 |" in lines, lines


@pytest.mark.parametrize("options,says", [
    (["--ckpt=a/ppo.pt,b/ppo.pt"], "two rows are named ppo"),
    (["--ckpt=bon", "--bon=0"], "needs --bon >= 1"),
    (["--sweep=True", "--sweep_methods=('PPO',)"], "--sweep_methods"),
    # an empty item, an empty name, a path for the best-of-N row (it was dropped), a directory
    (["--ckpt=a.pt,,b.pt"], "'' is not a path, name=path or bon"),
    (["--ckpt==a.pt"], "'=a.pt' is not a path"),
    (["--ckpt=bon=a.pt"], "'bon=a.pt' is not a path, name=path or bon (which takes no path)"),
    ([f"--ckpt={ROOT}"], f"{ROOT}: no such checkpoint file"), (["--reward=none.pt"], "--reward='none.pt'"),
])
def test_a_bad_row_list_is_one_line_before_anything_runs(tmp_path, options, says):
    r = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={tmp_path}", *options], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-1500:]
    assert says in lines[0] and not os.listdir(tmp_path)  # nothing was built or written


def test_a_log_line_cut_by_a_kill_does_not_stop_the_report(tmp_path):
    (tmp_path / "sft.jsonl").write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "loss": 1.5}\n{"iter": 3, "lo')
    assert [r["iter"] for r in runtime.read_log(str(tmp_path / "sft.jsonl"))] == [1, 2]
    assert runtime.read_log(str(tmp_path / "missing.jsonl")) == []


def test_a_prompt_with_no_room_for_its_answer_is_one_line_before_any_sampling(tmp_path):
    args = dict(block_size=32, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2, n_embd=16)
    runtime.save_checkpoint(str(tmp_path / "sft.pt"), {"model": M.GPT(M.GPTConfig(**args)).state_dict(),
                                                       "model_args": args, "kind": "sft", "step": 0,
                                                       "config": {}, "tokenizer": "world"})
    prompts = tmp_path / "prompts.jsonl"
    long = "Describe the cat and the dog and the owl and the fox."
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("Describe the cat.", long)) + "\n")
    r = subprocess.run([sys.executable, "evaluate.py", f"--out_dir={tmp_path}", f"--prompts={prompts}",
                        "--max_new_tokens=16", "--bon=0"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and r.stderr.startswith(f"error: {prompts}:2: the prompt is "), r.stderr[-1500:]
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "report.md").exists()


def test_the_best_of_n_kl_bound_by_hand():
    import evaluate
    assert evaluate.best_of_n_kl_bound(1) == 0.0  # one sample: SFT itself
    assert evaluate.best_of_n_kl_bound(2) == pytest.approx(math.log(2) - 0.5)
    assert evaluate.best_of_n_kl_bound(16) == pytest.approx(1.8351, abs=1e-4)  # the report's <= 1.84
    # the bound holds where answers coincide: two equally likely answers, best-of-16 picks the better one
    # unless all 16 draws are the worse: KL = sum p log(p / q) with p = (1 - 2**-16, 2**-16), q = (1/2, 1/2)
    p = [1 - 2 ** -16, 2 ** -16]
    assert sum(x * math.log(x / 0.5) for x in p) < evaluate.best_of_n_kl_bound(16)


def save_row(path, kind="sft", tokenizer="world", claims=None, **changes):
    """A tiny checkpoint that evaluate.py can read (weights of the shape its model_args say, unless claims
    changes what they say)."""
    args = {**dict(block_size=64, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2, n_embd=16,
                   scalar_head=kind == "reward"), **changes}
    torch.manual_seed(0)
    sd = M.GPT(M.GPTConfig(**args)).state_dict()
    runtime.save_checkpoint(str(path), {"model": sd, "model_args": {**args, **(claims or {})},
                                        "kind": kind, "step": 0, "config": {}, "tokenizer": tokenizer,
                                        "gain": 1.0, "bias": 0.0, "normalised": True})


@pytest.mark.parametrize("row, says", [
    (dict(kind="reward"), "is a 'reward' checkpoint; expected one of base, sft, ppo, grpo, dpo"),
    (dict(tokenizer="gpt2"), "uses another tokenizer than the SFT model"),
    (dict(block_size=16), "its block_size 16 has no room for the longest prompt"),  # generate's traceback
    (dict(claims=dict(n_head=3)), "the weights do not fit its model_args"),  # 16 dims do not split in 3
])
def test_a_row_that_cannot_be_evaluated_is_one_line_before_any_sampling(tmp_path, refusal, monkeypatch,
                                                                         row, says):
    """A row evaluate() would refuse (or crash on) only when its turn came, after SFT and the rows before it
    were sampled for minutes, is refused while the options and files are checked."""
    import rollout

    def sampled(*a, **k):
        raise AssertionError("a model was sampled before the rows were checked")
    for name in ("sample_and_grade", "best_of_n"):
        monkeypatch.setattr(rollout, name, sampled)
    save_row(tmp_path / "sft.pt")
    save_row(tmp_path / "row.pt", **row)
    rows = f"--ckpt=sft={tmp_path / 'sft.pt'},{tmp_path / 'row.pt'}"
    msg = refusal("evaluate", f"--out_dir={tmp_path}", rows, "--max_new_tokens=8")
    assert msg.startswith(f"error: {tmp_path / 'row.pt'}") and says in msg and "\n" not in msg, msg
    assert sorted(os.listdir(tmp_path)) == ["row.pt", "sft.pt"]


@pytest.mark.parametrize("rm, says", [
    (dict(vocab_size=64), "its vocabulary (64) is smaller than its tokenizer's"),  # an embedding IndexError
    (dict(tokenizer="gpt2"), "uses another tokenizer than the SFT model"),  # scores of other tokens: noise
])
def test_a_reward_model_that_cannot_score_the_rows_is_one_line_before_sampling(tmp_path, refusal, rm, says,
                                                                                 monkeypatch):
    import rollout
    monkeypatch.setattr(rollout, "sample_and_grade", lambda *a, **k: pytest.fail("sampled before the checks"))
    save_row(tmp_path / "sft.pt")
    save_row(tmp_path / "rm.pt", kind="reward", **rm)
    msg = refusal("evaluate", f"--out_dir={tmp_path}", f"--reward={tmp_path / 'rm.pt'}", "--bon=0",
                  "--max_new_tokens=8")
    assert msg.startswith(f"error: {tmp_path / 'rm.pt'}") and says in msg, msg


def test_a_reward_model_of_an_earlier_sft_model_is_one_line_before_sampling(tmp_path, refusal, monkeypatch):
    """sft.py run again leaves reward.pt from the old weights: ppo.py, grpo.py and dpo.py refused it, while
    evaluate.py scored every row and picked the best-of-N answers with it, normalised on the old model's."""
    import rollout
    monkeypatch.setattr(rollout, "sample_and_grade", lambda *a, **k: pytest.fail("sampled before the checks"))
    save_row(tmp_path / "sft.pt")
    save_row(tmp_path / "reward.pt", kind="reward")
    ck = torch.load(tmp_path / "reward.pt", weights_only=True)
    torch.save({**ck, "sft_fingerprint": "0" * 16}, tmp_path / "reward.pt")
    msg = refusal("evaluate", f"--out_dir={tmp_path}", "--max_new_tokens=8")
    assert msg == (f"error: {tmp_path / 'reward.pt'} was trained from another SFT model (the same network, "
                   "other weights: was sft.py run again?); train it anew with "
                   f"`python reward.py --out_dir={tmp_path}`")
    assert sorted(os.listdir(tmp_path)) == ["reward.pt", "sft.pt"]


@pytest.mark.parametrize("change, says", [({"normalised": False}, "was saved before training finished"),
                                          ({"gain": float("nan")}, "its gain, bias and lm_weight (nan,")])
def test_an_unusable_reward_model_is_refused_before_a_sweep_trains_anything(tmp_path, refusal, monkeypatch,
                                                                             change, says):
    """--reward was checked for its kind and shape only; the rest of load_reward_model's checks came when the
    rows were scored, which with --sweep=True is after every method has been trained at every beta."""
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    save_row(tmp_path / "sft.pt")
    save_row(tmp_path / "rm.pt", kind="reward")
    ck = torch.load(tmp_path / "rm.pt", weights_only=True)
    torch.save({**ck, **change}, tmp_path / "rm.pt")
    msg = refusal("evaluate", f"--out_dir={tmp_path}", f"--reward={tmp_path / 'rm.pt'}", "--sweep=True",
                  "--max_new_tokens=8")
    assert msg.startswith(f"error: {tmp_path / 'rm.pt'}") and says in msg, msg
    assert sorted(os.listdir(tmp_path)) == ["rm.pt", "sft.pt"]


@pytest.mark.parametrize("flag, shown", [("--dpo_betas=(0.1,0.0)", "(0.1, 0.0)"),
                                         ("--ppo_betas=(-0.1,)", "(-0.1,)"),
                                         ("--rloo_betas=(0.1,-1.0)", "(0.1, -1.0)")])
def test_a_sweep_beta_out_of_range_is_refused_before_any_run(tmp_path, refusal, flag, shown):
    msg = refusal("evaluate", f"--out_dir={tmp_path}", "--sweep", flag)
    assert msg.startswith(f"error: {flag.split('=')[0]}={shown} is out of range: it must be betas"), msg
    assert not os.listdir(tmp_path)


def test_a_sweep_with_nothing_to_train_is_refused(tmp_path, refusal):
    """--sweep=True with no beta for any chosen method and no beta = 0 run wrote results.json into a folder
    it never made (a traceback): it is one line, before anything is read."""
    for flags in (["--sweep_methods=()"], ["--sweep_methods=('rloo',)", "--rloo_betas=()"]):
        msg = refusal("evaluate", f"--out_dir={tmp_path}", "--sweep=True", "--hack_iters=0", *flags)
        assert msg == ("error: --sweep=True is out of range: it must be False when no method of "
                       "--sweep_methods has a beta and --hack_iters=0: nothing to train"), msg
    assert refusal("evaluate", f"--out_dir={tmp_path}", "--sweep=True", "--sweep_methods=()", "--bon=-1") == (
        "error: --bon=-1 is out of range: it must be >= 0")  # one run (hack_iters) is something to train
    assert os.listdir(tmp_path) == []


def test_a_best_of_n_row_with_no_reward_model_builds_nothing_first(tmp_path, refusal, monkeypatch):
    """--ckpt=bon with no reward model is refused before the missing SFT model is built (a pretrain.py and
    an sft.py run), not after."""
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    msg = refusal("evaluate", f"--out_dir={tmp_path}", "--ckpt=bon")
    assert msg == f"error: --ckpt: the best-of-N row needs a reward model; {tmp_path / 'reward.pt'} not found"
    assert built == [] and not os.listdir(tmp_path)


@pytest.mark.parametrize("content, says", [
    ('[{"stage": "ppo", "beta": 0.1, "gold": 0.5, "kl": 1.0', "is damaged (Expecting"),  # cut short
    (b"\xff\xfe", "is damaged ("),
    ('[{"stage": "ppo", "beta": 0.1, "gold": 0.5}]', "is not a list of {stage, beta, gold, kl} rows"),
    ('[{"stage": "xyz", "beta": 0.1, "gold": 0.5, "kl": 1.0}]', "is not a list of"),
    ('[{"stage": "dpo", "beta": 0.1, "gold": 0.5, "kl": NaN}]', "is not a list of"),
    ('{"stage": "dpo"}', "is not a list of")])
def test_a_damaged_sweep_file_is_one_line_before_anything_is_built_or_sampled(tmp_path, refusal, monkeypatch,
                                                                            content, says):
    """The report draws the sweep's frontier at its very end: a damaged results.json was a traceback there,
    after every model had been sampled, and the report was lost."""
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    (tmp_path / "sweep").mkdir()
    path = tmp_path / "sweep" / "results.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    msg = refusal("evaluate", f"--out_dir={tmp_path}")
    assert msg.startswith(f"error: {path} {says}") and "\n" not in msg, msg
    assert msg.endswith(f"; delete it or run `python evaluate.py --sweep=True --out_dir={tmp_path}` again")
    assert built == []


@pytest.mark.parametrize("obstacle", ["report.md", "figures"])
def test_something_in_the_reports_way_is_one_line_before_anything_is_built_or_sampled(tmp_path, refusal,
                                                                                      monkeypatch, obstacle):
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    (tmp_path / obstacle).mkdir() if obstacle == "report.md" else (tmp_path / obstacle).write_text("")
    msg = refusal("evaluate", f"--out_dir={tmp_path}")
    assert msg == (f"error: {tmp_path}/report.md is a directory or {tmp_path}/figures a file: the report "
                   "could not be written; move it away") and built == []


def test_a_damaged_row_or_reward_file_is_one_line_before_a_missing_sft_model_is_built(tmp_path, refusal,
                                                                                      monkeypatch):
    """The rows and --reward are read against the SFT model (check_rows) once it exists; when it has still
    to be built (minutes), a damaged file or one of the wrong kind is refused first, in one line."""
    built = []
    monkeypatch.setattr(runtime, "ensure_checkpoint", lambda *a: built.append(a))
    out, files = tmp_path / "out", tmp_path / "files"
    out.mkdir(), files.mkdir()
    (files / "damaged.pt").write_bytes(b"not a checkpoint")
    save_row(files / "ppo.pt", kind="ppo")
    save_row(files / "rm.pt", kind="reward")
    msg = refusal("evaluate", f"--out_dir={out}", f"--ckpt=ppo={files / 'ppo.pt'},x={files / 'damaged.pt'}")
    assert msg.startswith(f"error: {files / 'damaged.pt'} is not a readable checkpoint"), msg
    msg = refusal("evaluate", f"--out_dir={out}", f"--ckpt={files / 'rm.pt'}")  # a reward model as a row
    assert msg.startswith(f"error: {files / 'rm.pt'} is a 'reward' checkpoint; expected one of base"), msg
    msg = refusal("evaluate", f"--out_dir={out}", f"--reward={files / 'ppo.pt'}")
    assert msg == f"error: {files / 'ppo.pt'} is a 'ppo' checkpoint; expected one of reward", msg
    assert built == [] and not os.listdir(out)


def test_the_sweep_runs_the_scripts_beside_it_from_any_directory(tmp_path, monkeypatch):
    """The sweep's training runs are the scripts in evaluate.py's own folder, as a missing stage's are
    (runtime.ensure_checkpoint): they were named relative to the working directory, so `python
    path/to/evaluate.py --sweep=True` run from elsewhere failed at its first run."""
    import types
    import evaluate
    (tmp_path / "out").mkdir()
    for f in ("sft.pt", "reward.pt", "comparisons.jsonl"):
        (tmp_path / "out" / f).write_bytes(b"copied, not read")
    monkeypatch.chdir(tmp_path)  # not the repository
    for name, value in (("out_dir", "out"), ("sweep_methods", ("ppo", "rloo")), ("ppo_betas", (0.1,)),
                        ("rloo_betas", (0.2,)), ("hack_iters", 0)):
        monkeypatch.setattr(evaluate, name, value)
    runs = []

    def train(cmd, **kw):
        runs.append(cmd)
        return types.SimpleNamespace(returncode=0 if os.path.isfile(cmd[1]) else 2)  # python: no such file
    monkeypatch.setattr(evaluate.subprocess, "run", train)
    monkeypatch.setattr(evaluate, "evaluate", lambda rt, paths, *a: {m: {"gold": 0.8, "kl": 1.0}
                                                                      for m in paths})
    written, write_whole = [], runtime.write_whole
    monkeypatch.setattr(runtime, "write_whole", lambda path, w: written.append(path) or write_whole(path, w))
    evaluate.run_sweep(None, [], "out/reward.pt")
    sweep = os.path.join("out", "sweep")
    assert written == [os.path.join(sweep, "results.json")]  # whole or not at all: a kill leaves no half file
    assert [c[1:] for c in runs] == [
        [os.path.join(ROOT, "ppo.py"), f"--out_dir={os.path.join(sweep, 'ppo_beta0.1')}", "--beta=0.1"],
        [os.path.join(ROOT, "grpo.py"), "--baseline=rloo", f"--out_dir={os.path.join(sweep, 'rloo_beta0.2')}",
         "--beta=0.2"]]
    setup = evaluate.sampling_setup()  # how the points were measured: a report may join them only if alike
    assert json.loads((tmp_path / sweep / "results.json").read_text()) == [
        {"stage": "ppo", "beta": 0.1, "gold": 0.8, "kl": 1.0, "setup": setup},
        {"stage": "rloo", "beta": 0.2, "gold": 0.8, "kl": 1.0, "setup": setup}]


def test_a_damaged_stage_log_costs_its_lines_not_the_report(tmp_path):
    """The figures read every stage's log after all the sampling: a bad byte or a line that is not an object
    was a traceback there, and the report was lost."""
    path = tmp_path / "sft.jsonl"
    path.write_bytes(b'{"iter": 1, "loss": 2.0}\n\xff\n[1]\n{"iter": 2, "loss": 1.5}\n{"iter": 3, "lo')
    assert runtime.read_log(str(path)) == [{"iter": 1, "loss": 2.0}, {"iter": 2, "loss": 1.5}]
    assert runtime.read_log(str(tmp_path / "none.jsonl")) == []


def test_the_end_of_stage_check_clusters_its_interval_by_prompt(monkeypatch, capsys):
    """ppo.py's and dpo.py's closing check answers each held-out prompt several times: its interval, like the
    report's, treats one prompt's answers as one cluster. SFT scores 0.5 everywhere (it is judged first); the
    policy 1 on the cat, 0 on the dog, 3 answers each: p = 1/2, residual sums +3/2 and -3/2, variance
    2/1 x (9/4 + 9/4) / 6^2 = 1/4, half-width 1.96 x 1/2 (as 6 independent pairs: 1.96 x sqrt(0.3 / 6))."""
    import rollout
    calls = []

    def gold(p, text, ended):
        calls.append(p)
        return 0.5 if len(calls) <= 6 else float("cat" in p[-1]["content"])
    monkeypatch.setattr(world, "gold", gold)
    torch.manual_seed(0)
    net = M.GPT(M.GPTConfig(block_size=64, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2,
                            n_embd=16)).eval()
    prompts = [[{"role": "user", "content": f"Describe the {x}."}] for x in ("cat", "dog")] * 3
    got = rollout.compare_to_sft("policy", net, net, get_tokenizer("world"), prompts, 8,
                                 generator=torch.Generator().manual_seed(0))
    assert len(calls) == 12 and got["win_rate"] == 0.5
    assert got["win_ci"] == pytest.approx(1.96 * 0.5)
    assert "policy wins 50.0% +- 98.0% against SFT" in capsys.readouterr().out


def test_the_end_of_stage_check_over_one_prompt_prints_its_interval_as_n_a(monkeypatch, capsys):
    """Answers to a single held-out prompt (--n_eval=1) are one cluster: the interval has no spread to
    measure, its half-width is nan, and the closing check prints n/a, not 'nan%'. SFT scores 0.5, the policy
    1: a win rate of 1."""
    import rollout
    calls = []
    monkeypatch.setattr(world, "gold",
                        lambda p, text, ended: calls.append(p) or (0.5 if len(calls) <= 3 else 1.0))
    torch.manual_seed(0)
    net = M.GPT(M.GPTConfig(block_size=64, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2,
                            n_embd=16)).eval()
    prompts = [[{"role": "user", "content": "Describe the cat."}]] * 3
    got = rollout.compare_to_sft("policy", net, net, get_tokenizer("world"), prompts, 8,
                                 generator=torch.Generator().manual_seed(0))
    assert len(calls) == 6 and got["win_rate"] == 1.0 and math.isnan(got["win_ci"])
    out = capsys.readouterr().out
    assert "policy wins 100.0% +- n/a against SFT (ties count half)" in out and "nan" not in out


def test_the_end_of_stage_check_says_why_a_kl_below_zero_is_possible(monkeypatch, capsys):
    """The KL is a mean over samples of log pi - log SFT (k1): unbiased, but a policy that barely moved can
    show a mean below 0 by chance, which the line then explains; a mean at or above 0 needs no note."""
    import rollout
    net = M.GPT(M.GPTConfig(block_size=64, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2,
                            n_embd=16)).eval()
    prompts = [[{"role": "user", "content": "Describe the cat."}]] * 2
    for kl, note in ((-0.004, True), (0.0, False), (0.3, False)):
        monkeypatch.setattr(rollout, "sample_kl", lambda logprobs, ref, seq, *a: torch.full((len(seq),), kl))
        got = rollout.compare_to_sft("policy", net, net, get_tokenizer("world"), prompts, 4,
                                     generator=torch.Generator().manual_seed(0))
        line = next(s for s in capsys.readouterr().out.splitlines() if "KL(policy || sft)" in s)
        why = " (a mean of samples' log pi - log sft: below 0 by chance)" * note
        assert got["kl"] == pytest.approx(kl) and line.endswith(f"= {kl:.2f} nats per answer{why}"), line


def test_a_reward_model_with_the_likelihood_term_scores_with_it(tmp_path, monkeypatch):
    """A reward model trained with --lm_feature is head + w * log p_SFT: the RM-score column and best-of-n's
    pick both hand its saved w to the scorer (without it they would rank by the head alone)."""
    import evaluate
    save_online_inputs(tmp_path, lm_weight=0.05)
    seen, real = [], (evaluate.reward_scores, evaluate.best_of_n)
    monkeypatch.setattr(evaluate, "reward_scores", lambda *a, **k: seen.append(("rm", k)) or real[0](*a, **k))
    monkeypatch.setattr(evaluate, "best_of_n", lambda *a, **k: seen.append(("bon", k)) or real[1](*a, **k))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Describe the cat."}) + "\n")
    run_here(monkeypatch, evaluate, f"--out_dir={tmp_path}", f"--prompts={prompts}", "--samples=2", "--bon=2",
             "--max_new_tokens=6", "--device=cpu")
    assert {s for s, _ in seen} == {"rm", "bon"} and all(k["lm_weight"] == 0.05 for _, k in seen), seen


def test_every_answer_is_scored_by_the_reward_model_once(tmp_path, monkeypatch):
    """Best-of-n scores its n candidates to pick one; the RM-score column then takes the picks' scores
    (their mean) rather than scoring the picks a second time."""
    import evaluate
    import rollout
    save_online_inputs(tmp_path)
    ck = torch.load(tmp_path / "reward.pt", weights_only=True)  # a head that tells the answers apart
    ck["model"]["scalar_head.weight"] = torch.randn(ck["model"]["scalar_head.weight"].shape)
    runtime.save_checkpoint(str(tmp_path / "reward.pt"), ck)
    scored, real = [], rollout.reward_scores

    def spy(rm, enc, conversations, replies, *a, **k):
        scores = real(rm, enc, conversations, replies, *a, **k)
        scored.extend(zip([r["text"] for r in replies], scores.tolist()))
        return scores
    monkeypatch.setattr(rollout, "reward_scores", spy)  # best_of_n's
    monkeypatch.setattr(evaluate, "reward_scores", spy)  # the RM-score column's
    results, real_evaluate = {}, evaluate.evaluate
    monkeypatch.setattr(evaluate, "evaluate", lambda *a: results.update(real_evaluate(*a)) or results)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Describe the cat."}) + "\n")
    run_here(monkeypatch, evaluate, f"--out_dir={tmp_path}", f"--prompts={prompts}", "--samples=2", "--bon=3",
             "--max_new_tokens=6", "--device=cpu")
    assert len(scored) == 2 + 2 * 3  # SFT's 2 answers, then 3 candidates for each of best-of-3's 2
    assert len({s for _, s in scored[2:5]}) == len({s for _, s in scored[5:]}) == 3  # a pick to make
    picks = [max(scored[2 + 3 * i:5 + 3 * i], key=lambda c: c[1]) for i in range(2)]
    assert [s["text"] for s in results["bon"]["samples"]] == [t for t, _ in picks]
    assert results["bon"]["rm_score"] == pytest.approx(sum(s for _, s in picks) / 2)
    assert results["sft"]["rm_score"] == pytest.approx(sum(s for _, s in scored[:2]) / 2)


def test_one_sweep_row_measured_otherwise_keeps_the_reports_rows_off_the_frontier(tmp_path, monkeypatch):
    """The report's own rows join a method's frontier only when every sweep row was measured as they were; one
    sweep row at another temperature is enough to keep them off."""
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    (tmp_path / "sweep").mkdir()
    other = evaluate.sampling_setup()[:2] + [0.7] + evaluate.sampling_setup()[3:]
    sweep = [{"stage": "ppo", "beta": 0.1, "gold": 0.8, "kl": 1.0, "setup": evaluate.sampling_setup()},
             {"stage": "ppo", "beta": 0.2, "gold": 0.85, "kl": 0.5, "setup": other}]
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(sweep))
    lines = evaluate.draw_figures({"sft": {"gold": 0.7, "kl": 0.0}, "ppo": {"gold": 0.5, "kl": 2.0}},
                                  str(tmp_path / "figures"))
    assert not any(line.startswith("- ppo default") for line in lines)


def made_up_results(names, rm=True):
    """Results as evaluate() returns them, with numbers chosen so that every cell of the report differs."""
    prompt = [{"role": "user", "content": "Describe the cat."}]
    out = {}
    for i, n in enumerate(names):
        r = {"gold": 0.5 + i / 8, "win_vs_sft": 0.5 - i / 4, "win_ci": 0.125 + i / 32, "kl": 0.25 + i,
             "fluency": 0.75 - i / 16, "ended": 0.875 - i / 4, "n": 2,
             "missing": {k: (j + 1) / 64 + i / 8 for j, k in enumerate(world.WEIGHTS)},
             "samples": [{"prompt": prompt, "text": f"answer {n} {j}", "ended": j == 0, "gold": 0.25 * j}
                         for j in range(2)]}
        if rm:
            r["rm_score"] = -0.25 + i
        out[n] = r
    return out


def test_the_report_shows_n_a_for_one_prompts_interval_and_says_what_is_held_out(tmp_path, monkeypatch):
    """One prompt has no spread to measure: win_rate's nan half-width reads n/a, not 'nan%' or a certain 0.
    The world's held-out prompts are said to share their tasks with training; a prompts file's are not."""
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    results = made_up_results(["sft", "ppo"])
    results["ppo"]["win_ci"] = world.win_rate([0.9, 0.1], [0.5, 0.5], ["a", "a"])[1]
    evals = [results["sft"]["samples"][0]["prompt"]]
    lines = evaluate.write_report(results, ["sft", "ppo"], evals, str(tmp_path / "figures"))
    assert "| ppo | 0.625 | 25.0% ± n/a | 1.25 | +0.75 | 68.8% | 62.5% |" in lines
    assert "new conversations, not new tasks" in lines[2] and "nan" not in "\n".join(lines)
    monkeypatch.setattr(evaluate, "prompts", "mine.jsonl")
    lines = evaluate.write_report(results, ["sft", "ppo"], evals, str(tmp_path / "figures"))
    assert "new tasks" not in lines[2] and "prompts from mine.jsonl" in lines[2]


def test_the_report_rows_show_each_models_own_numbers_in_their_columns(tmp_path, monkeypatch):
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    monkeypatch.setattr(evaluate, "bon", 4)
    results = made_up_results(["sft", "bon", "ppo"])
    del results["ppo"]["rm_score"]  # a row the reward model did not score: "-"
    evals = [results["sft"]["samples"][0]["prompt"]] * 2
    lines = evaluate.write_report(results, ["sft", "bon", "ppo"], evals, str(tmp_path / "figures"))
    assert lines == (tmp_path / "report.md").read_text().splitlines()
    # gold .3f | win ± interval, % | KL .2f (best-of-N's a bound) | RM score +.2f | fluency | ends turn
    assert "| sft | 0.500 | 50.0% ± 12.5% | 0.25 | -0.25 | 75.0% | 87.5% |" in lines
    assert "| best-of-4 | 0.625 | 25.0% ± 15.6% | ≤ 1.25 | +0.75 | 68.8% | 62.5% |" in lines
    assert "| ppo | 0.750 | 0.0% ± 18.8% | 2.25 | - | 62.5% | 37.5% |" in lines
    # where the gold is lost: one column per component, in WEIGHTS' order
    head = "| model | " + " | ".join(world.WEIGHTS) + " |"
    assert head == "| model | helpful | harmless | ended | fluent | concise |" and head in lines
    assert "| sft | 0.016 | 0.031 | 0.047 | 0.062 | 0.078 |" in lines  # (j + 1) / 64
    assert "| ppo | 0.266 | 0.281 | 0.297 | 0.312 | 0.328 |" in lines  # (j + 1) / 64 + 2 / 8
    # the sample conversations: each row's answer to the prompt, and whether it ended its turn
    assert "- best-of-4 (gold 0.00): `answer bon 0`" in lines
    assert "- ppo (gold 0.25): `answer ppo 1` *(never ended its turn)*" in lines


def test_a_prompt_or_reply_holding_markdown_cannot_restructure_the_report(tmp_path, monkeypatch):
    """A --prompts file's "# heading" became a heading of report.md, and an unclosed fence swallowed the rest
    of the report, its figures included; a | in a --ckpt row's name added a cell to its rows."""
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    results = made_up_results(["sft", "p|po"])
    prompt = [{"role": "user", "content": "Hi\n# Not a heading\n```"}]
    for r in results.values():
        r["samples"][0] = {**r["samples"][0], "prompt": prompt, "text": "a `b`\n\n```\n## c"}
    lines = evaluate.write_report(results, ["sft", "p|po"], [prompt] * 2, str(tmp_path / "figures"))
    assert "**user:** `Hi # Not a heading '''`" in lines
    assert "- p\\|po (gold 0.00): `a 'b' ''' ## c`" in lines
    tables = [line for line in lines if line.startswith("| p")]  # its rows in the two tables
    assert [line.split(" | ")[0] for line in tables] == ["| p\\|po"] * 2
    assert [line.replace("\\|", "").count("|") for line in tables] == [8, 7]  # as many cells as sft's rows
    assert not any(line.startswith(("# Not", "## c", "```")) for line in lines)


def test_json_out_prints_every_number_but_the_samples_and_the_printed_table_is_the_reports(tmp_path,
                                                                                         monkeypatch, capsys):
    import evaluate
    save_row(tmp_path / "sft.pt")
    save_row(tmp_path / "ppo.pt", kind="ppo")
    save_row(tmp_path / "base.pt", kind="base")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Describe the cat."}) + "\n")
    results = made_up_results(["sft", "base", "ppo"])  # evaluate() answers with SFT, the reference, first
    seen = []
    monkeypatch.setattr(evaluate, "evaluate", lambda rt, paths, *a, **k: seen.append(list(paths)) or results)
    run_here(monkeypatch, evaluate, f"--out_dir={tmp_path}", f"--prompts={prompts}", "--max_new_tokens=8",
             "--device=cpu", "--json_out=True")
    out = capsys.readouterr().out
    assert seen == [["base", "sft", "ppo"]]
    table = (tmp_path / "report.md").read_text().split("\n\n")[2].splitlines()  # header, rule, one per row
    assert [row.split(" | ")[0] for row in table[2:]] == ["| base", "| sft", "| ppo"]  # the stages' order
    assert "\n".join(table) in out  # the table printed is the report's, every row of it
    shown = json.loads(out[out.index("\n{") + 1:])
    assert shown == {n: {k: v for k, v in r.items() if k != "samples"} for n, r in results.items()}
    assert "rm_score" in shown["ppo"] and "missing" in shown["sft"]


def test_json_out_prints_one_prompts_nan_interval_as_null(tmp_path, monkeypatch, capsys):
    """One prompt's win-rate interval is nan (no spread to measure): --json_out prints it as null, which every
    JSON reader takes, not Python's NaN, which strict readers refuse; the other numbers are printed as they
    are, and the report reads n/a."""
    import evaluate
    save_row(tmp_path / "sft.pt")
    save_row(tmp_path / "ppo.pt", kind="ppo")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Describe the cat."}) + "\n")
    results = made_up_results(["sft", "ppo"])
    results["ppo"]["win_ci"] = world.win_rate([0.9, 0.1], [0.5, 0.5], ["a", "a"])[1]
    assert math.isnan(results["ppo"]["win_ci"])
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: results)
    run_here(monkeypatch, evaluate, f"--out_dir={tmp_path}", f"--prompts={prompts}", "--max_new_tokens=8",
             "--device=cpu", "--json_out=True")
    out = capsys.readouterr().out
    text = out[out.index("\n{") + 1:]
    assert "NaN" not in text

    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    shown = json.loads(text, parse_constant=refuse)
    assert shown["ppo"]["win_ci"] is None and shown["sft"]["win_ci"] == results["sft"]["win_ci"] == 0.125
    assert {k: v for k, v in shown["ppo"].items() if k != "win_ci"} == {
        k: v for k, v in results["ppo"].items() if k not in ("samples", "win_ci")}
    assert "± n/a |" in (tmp_path / "report.md").read_text()


def test_no_sweep_beta_repeats_a_methods_default_run():
    """The default run of each method is one point of its frontier already: a sweep beta equal to its default
    would train the same run twice and leave the frontier a point short. The defaults: ppo.beta, dpo.beta,
    and grpo.py's None, which stands for GRPO 0.6 and RLOO 0.3 (test_grpo checks the weights it uses)."""
    import evaluate
    import dpo
    import grpo
    import ppo
    assert grpo.beta is None
    defaults = {"ppo": ppo.beta, "dpo": dpo.beta, "grpo": 0.6, "rloo": 0.3}
    for method in evaluate.sweep_methods:
        betas = getattr(evaluate, f"{method}_betas")
        assert betas and defaults[method] not in betas, (method, betas, defaults[method])
        assert len(set(betas)) == len(betas) and all(b > 0 for b in betas), (method, betas)


def tiny_chat_net(seed):
    torch.manual_seed(seed)
    return M.GPT(M.GPTConfig(block_size=64, vocab_size=get_tokenizer("world").n_vocab, n_layer=1, n_head=2,
                             n_embd=16)).eval()


def test_the_end_of_stage_check_reports_the_policy_against_sft_not_the_other_way(monkeypatch, capsys):
    """SFT is judged first (gold 0.25 on each of its answers), the policy second (0.75 on each): the policy
    wins every prompt, its gold and SFT's land in their own keys, and its KL to SFT is measured (a policy
    other than SFT: not 0; SFT against itself: 0 up to the cache's rounding)."""
    import rollout
    calls = []

    def gold(p, text, ended):
        calls.append(p)
        return 0.25 if len(calls) <= 4 else 0.75
    monkeypatch.setattr(world, "gold", gold)
    prompts = [[{"role": "user", "content": f"Describe the {x}."}] for x in ("cat", "dog")] * 2
    enc = get_tokenizer("world")
    got = rollout.compare_to_sft("policy", tiny_chat_net(1), tiny_chat_net(0), enc, prompts, 8,
                                 generator=torch.Generator().manual_seed(0))
    assert len(calls) == 8 and got["win_rate"] == 1.0
    assert got["gold"] == 0.75 and got["sft_gold"] == 0.25
    assert abs(got["kl"]) > 1e-3
    assert "policy wins 100.0% +-" in capsys.readouterr().out
    calls.clear()
    same = tiny_chat_net(0)
    assert abs(rollout.compare_to_sft("policy", same, same, enc, prompts, 8)["kl"]) < 1e-5


def test_score_judges_each_answer_with_its_own_ending_and_at_its_temperature(monkeypatch):
    """The hidden human is told whether each answer ended its turn; the KL to a reference that is the model
    itself is 0 at any temperature (both read softmax(z / T)); temperature 0 is greedy (the seed cannot
    matter)."""
    import rollout
    monkeypatch.setattr(world, "gold", lambda p, text, ended: float(ended))
    net, enc = tiny_chat_net(0), get_tokenizer("world")
    prompts = world.prompts("eval")[:4]
    g = torch.Generator().manual_seed(0)
    res = rollout.sample_and_grade(net, enc, prompts, 6, temperature=0.5, ref=net, generator=g)
    assert res["n"] == 4 and not all(s["ended"] for s in res["samples"])  # a random net seldom ends
    assert all(s["gold"] == float(s["ended"]) for s in res["samples"])
    assert all(abs(s["kl"]) < 1e-4 for s in res["samples"]), [s["kl"] for s in res["samples"]]
    texts = [[s["text"] for s in rollout.sample_and_grade(net, enc, prompts, 6, temperature=0,
                                               generator=torch.Generator().manual_seed(seed))["samples"]]
             for seed in (1, 2)]
    assert texts[0] == texts[1]


def test_the_sweep_runs_each_method_at_each_beta_then_a_long_beta_0_ppo_run(tmp_path, monkeypatch):
    """run_sweep: one run per (method, beta), each in a folder of its own holding copies of sft.pt, reward.pt
    and comparisons.jsonl, each evaluated into results.json; then, with --hack_iters, PPO at beta 0 for that
    many iterations in ppo_beta0_long (where draw_figures reads its log), which is no frontier point."""
    import types
    import evaluate
    out = tmp_path / "out"
    out.mkdir()
    inputs = ("sft.pt", "reward.pt", "comparisons.jsonl")
    for f in inputs:
        (out / f).write_text(f"the {f} of this run")
    for name, value in (("out_dir", str(out)), ("sweep_methods", ("ppo", "dpo")), ("ppo_betas", (0.1, 0.2)),
                        ("dpo_betas", (0.5,)), ("hack_iters", 7)):
        monkeypatch.setattr(evaluate, name, value)
    runs, evaluated = [], []
    monkeypatch.setattr(evaluate.subprocess, "run",
                        lambda cmd, **kw: runs.append(cmd) or types.SimpleNamespace(returncode=0))
    monkeypatch.setattr(evaluate, "evaluate", lambda rt, paths, *a: evaluated.append(paths)
                        or {m: {"gold": 0.5, "kl": 1.0} for m in paths})
    evaluate.run_sweep(None, [], str(out / "reward.pt"))
    sweep = out / "sweep"
    dirs = {"ppo_beta0.1": "--beta=0.1", "ppo_beta0.2": "--beta=0.2", "dpo_beta0.5": "--beta=0.5",
            "ppo_beta0_long": "--beta=0.0"}
    assert [c[2:4] for c in runs] == [[f"--out_dir={sweep / d}", b] for d, b in dirs.items()]
    assert runs[-1][1].endswith("ppo.py")
    assert runs[-1][4:] == ["--max_iters=7", "--n_eval=16", "--eval_samples=1"]
    assert all((sweep / d / f).read_text() == f"the {f} of this run" for d in dirs for f in inputs)
    assert evaluated == [{m: str(sweep / d / f"{m}.pt")} for m, d in
                         (("ppo", "ppo_beta0.1"), ("ppo", "ppo_beta0.2"), ("dpo", "dpo_beta0.5"))]
    rows = json.loads((sweep / "results.json").read_text())
    assert [(r["stage"], r["beta"]) for r in rows] == [("ppo", 0.1), ("ppo", 0.2), ("dpo", 0.5)]


def circles(svg):
    """The (x, y) of every point an SVG chart draws."""
    import re
    return [(float(x), float(y)) for x, y in re.findall(r'<circle cx="([-\d.]+)" cy="([-\d.]+)"', svg)]


def test_svg_plot_maps_the_data_onto_the_axes_with_a_margin_above_and_below(tmp_path):
    """The chart's axes run from x = 60 to 390 and from y = 295 (the x axis) up to 30. x spans the data
    exactly: (0, 0), (2, 1), (4, 2) sit at x 60, 225 and 390. y is padded by 5% of its range either way,
    -0.1 to 2.1, so y = 0 is drawn 0.1 / 2.2 of the height (265) above the axis, at 283.0; y = 1 at 162.5,
    y = 2 at 42.0."""
    import evaluate
    evaluate.svg_plot(str(tmp_path / "a.svg"), "t", "x", "y", [("s", [0, 2, 4], [0, 1, 2], "red", True)])
    got = circles((tmp_path / "a.svg").read_text())
    want = [(60, 295 - 265 * 0.1 / 2.2), (225, 162.5), (390, 295 - 265 * 2.1 / 2.2)]
    assert got == [(pytest.approx(x, abs=0.06), pytest.approx(y, abs=0.06)) for x, y in want]


def test_svg_plot_draws_a_single_point_and_marks_the_points_of_short_lines_only(tmp_path):
    """One point (the SFT row at KL 0) has no range to scale by: it is drawn at the left axis, inside the
    chart. A line of up to 12 points marks each; a longer line (a training curve) is the line alone."""
    import evaluate
    evaluate.svg_plot(str(tmp_path / "one.svg"), "t", "x", "y", [("SFT", [0.0], [0.7], "black", False)])
    (x, y), = circles((tmp_path / "one.svg").read_text())
    assert x == 60 and 30 <= y <= 295
    for n, marked in ((12, 12), (13, 0)):
        line = [("c", list(range(n)), [1.0] * n, "red", True)]
        evaluate.svg_plot(str(tmp_path / "c.svg"), "t", "x", "y", line)
        svg = (tmp_path / "c.svg").read_text()
        assert len(circles(svg)) == marked and svg.count("<polyline") == 1


def test_the_rows_are_each_stage_present_in_pipeline_order_with_best_of_n_after_sft(tmp_path, monkeypatch):
    """Without --ckpt: every stage whose checkpoint is in out_dir, in the order base, sft, ppo, grpo, rloo,
    dpo (not the order they were written), and the best-of-N row right after SFT, but only with --bon > 0
    and a reward model to pick with."""
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    monkeypatch.setattr(evaluate, "bon", 16)
    for n in ("dpo", "rloo", "sft", "base", "ppo"):  # no grpo.pt
        (tmp_path / f"{n}.pt").write_bytes(b"")
    rm = str(tmp_path / "reward.pt")
    assert list(evaluate.checkpoints_to_compare(rm)) == ["base", "sft", "ppo", "rloo", "dpo"]  # no reward.pt
    (tmp_path / "reward.pt").write_bytes(b"")
    paths = evaluate.checkpoints_to_compare(rm)
    assert list(paths) == ["base", "sft", "bon", "ppo", "rloo", "dpo"]
    assert paths["bon"] is None and paths["rloo"] == str(tmp_path / "rloo.pt")
    monkeypatch.setattr(evaluate, "bon", 0)
    assert "bon" not in evaluate.checkpoints_to_compare(rm)


def test_a_stages_training_curve_shows_its_held_out_column_where_it_was_measured(tmp_path, monkeypatch):
    """dpo.jsonl's training loss at every step and its held-out "val/loss" where one was logged (2 of 3)."""
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    rows = [{"iter": 1, "loss": 0.7, "val/loss": None}, {"iter": 2, "loss": 0.6, "val/loss": 0.65},
            {"iter": 3, "loss": 0.5, "val/loss": 0.55}]
    (tmp_path / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = evaluate.draw_figures({}, str(tmp_path / "figures"))
    svg = (tmp_path / "figures" / "dpo.svg").read_text()
    assert "![dpo](figures/dpo.svg)" in lines
    assert ">loss</text>" in svg and ">val/loss</text>" in svg and len(circles(svg)) == 3 + 2


def test_the_frontier_joins_points_by_kl_and_puts_best_of_n_at_its_kl_and_gold(tmp_path, monkeypatch):
    """A sweep's points come in beta order, not KL order: the frontier's line joins them by KL, left to right.
    The best-of-N point, KL 1.5 and gold 0.85, lies between PPO's (1.0, 0.8) and (2.0, 0.9) on both axes."""
    import re
    import evaluate
    monkeypatch.setattr(evaluate, "out_dir", str(tmp_path))
    (tmp_path / "sweep").mkdir()
    sweep = [{"stage": "ppo", "beta": b, "gold": g, "kl": kl, "setup": evaluate.sampling_setup()}
             for b, g, kl in ((0.05, 0.9, 2.0), (0.2, 0.7, 0.5), (0.1, 0.8, 1.0))]
    (tmp_path / "sweep" / "results.json").write_text(json.dumps(sweep))
    results = {"sft": {"gold": 0.6, "kl": 0.0}, "bon": {"gold": 0.85, "kl": 1.5}}
    evaluate.draw_figures(results, str(tmp_path / "figures"))
    svg = (tmp_path / "figures" / "frontier.svg").read_text()
    points, = re.findall(r'<polyline points="([^"]+)"', svg)
    xs = [float(p.split(",")[0]) for p in points.split()]
    assert len(xs) == 3 and xs == sorted(xs)

    def dots(color):
        return sorted(circles("".join(re.findall(f'<circle [^>]*fill="{color}"/>', svg))))
    (bx, by), = dots("gray")
    ppo = dots("#1f77b4")  # by KL; a higher gold is drawn higher up, at a smaller y
    assert ppo[1][0] < bx < ppo[2][0] and ppo[2][1] < by < ppo[1][1]


def test_the_closing_time_line_counts_the_sweep(tmp_path, monkeypatch, capsys):
    """With --sweep=True nearly all the wall time is the sweep's runs: the stopwatch started after them, so
    the line that says where the time goes left them out."""
    import importlib
    import time
    import evaluate
    save_row(tmp_path / "sft.pt")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", f"--out_dir={tmp_path}", "--sweep=True", "--bon=0",
                                      "--max_new_tokens=8"])
    monkeypatch.setattr(evaluate, "run_sweep", lambda *a: time.sleep(0.3))
    monkeypatch.setattr(evaluate, "evaluate", lambda rt, paths, *a: {"sft": {"gold": 0.5, "kl": 0.0}})
    monkeypatch.setattr(evaluate, "write_report", lambda *a: (os.makedirs(a[-1]), ["a report line"])[1])
    try:
        evaluate.main()
    finally:
        importlib.reload(evaluate)  # main() set its options on the module: the defaults again for other tests
    line = capsys.readouterr().out.strip().splitlines()[-1]
    sweep_s = float(line.split("beta sweep (training and evaluating its runs) ")[1].split(" s")[0])
    assert line.startswith("evaluate time ") and sweep_s >= 0.3, line


def test_the_graders_means_are_the_hidden_humans_grades_averaged_over_every_reply():
    """rollout.grade judges each reply on its own (gold, fluency, ended; kl from kls, else 0) and summarise
    averages them: the best-of-N row and every sample_and_grade() row are read off these means."""
    import rollout
    evals = world.prompts("eval")[:4]
    replies = [{"text": world.ideal(p), "ended": True} for p in evals[:2]] + [
        {"text": "You are dumb.", "ended": False} for _ in evals[2:]]
    samples = rollout.grade(evals, replies)
    assert [s["gold"] for s in samples[:2]] == [1.0, 1.0] and all(s["kl"] == 0.0 for s in samples)
    bad = [world.gold(p, "You are dumb.", False) for p in evals[2:]]
    res = rollout.summarise(samples)
    assert res["n"] == 4 and res["gold"] == pytest.approx((2.0 + sum(bad)) / 4) and res["ended"] == 0.5
    assert rollout.summarise(rollout.grade(evals[:2], replies[:2], [0.5, 1.5]))["kl"] == pytest.approx(1.0)
    assert rollout.summarise([])["n"] == 0  # no replies: no division by zero


def test_the_grader_reads_fluency_gold_and_ended_off_each_reply_not_its_prompt():
    import rollout
    evals = world.prompts("eval")[:2]
    replies = [{"text": "the the the owl owl", "ended": False},
               {"text": world.ideal(evals[1]), "ended": True}]
    samples = rollout.grade(evals, replies)
    assert [s["fluency"] for s in samples] == [world.fluency(r["text"]) for r in replies] == [0.0, 1.0]
    assert [(s["prompt"], s["text"], s["ended"]) for s in samples] == [
        (p, r["text"], r["ended"]) for p, r in zip(evals, replies)]
    assert samples[0]["gold"] == world.gold(evals[0], "the the the owl owl", False)
    assert samples[1]["gold"] == 1.0
    assert rollout.summarise(samples)["fluency"] == 0.5


def test_rows_that_just_fit_and_share_the_reference_models_tokenizer_pass_and_an_empty_reply_shows(
        tmp_path, monkeypatch):
    """check_rows refuses only a block_size with less than the longest prompt and --max_new_tokens more, and
    a tokenizer other than the reference SFT model's (whichever that is); md_code shows an empty reply."""
    import evaluate
    from data.chat import render_prompt
    enc = get_tokenizer("world")
    prompts = world.prompts("eval")[:3]
    longest = max(len(render_prompt(enc, p)) for p in prompts)
    monkeypatch.setattr(evaluate, "max_new_tokens", 8)
    sft, ppo = str(tmp_path / "sft.pt"), str(tmp_path / "ppo.pt")
    for tok in ("world", "gpt2"):  # (the tokenizer is only a name here: enc reads every row's tokens)
        save_row(sft, tokenizer=tok, block_size=longest + 8)
        save_row(ppo, kind="ppo", tokenizer=tok, block_size=longest + 8)
        evaluate.check_rows({"sft": sft, "ppo": ppo}, sft, runtime.load_checkpoint(sft, "sft"), prompts, enc)
    save_row(ppo, kind="ppo", tokenizer="gpt2", block_size=longest + 7)
    with pytest.raises(SystemExit, match=f"its block_size {longest + 7} has no room for the longest prompt"):
        evaluate.check_rows({"sft": sft, "ppo": ppo}, sft, runtime.load_checkpoint(sft, "sft"), prompts, enc)
    assert evaluate.md_code("") == evaluate.md_code(" \n\t") == "`(empty)`"
    assert evaluate.md_code(" a  b\n") == "`a b`"
