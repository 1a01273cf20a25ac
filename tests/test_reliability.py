"""Every command survives: a bad option or a damaged checkpoint is one line (no traceback) with a non-zero
exit and nothing in out_dir written, truncated or deleted; no checkpoint with a NaN is ever written; a failed
write keeps the old file and leaves no temporary file. Most cases fail before any model is built, so the file
is fast."""
import errno
import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import weakref

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
import runtime  # noqa: E402
from conftest import torchrun_launcher  # noqa: E402
from data import world  # noqa: E402
from data.tokenizer import get_tokenizer  # noqa: E402

N_VOCAB = get_tokenizer("world").n_vocab
TRAINERS = ["sft", "reward", "ppo", "dpo"]
SCRIPTS = TRAINERS + ["grpo", "pretrain", "evaluate", "chat"]
BAD_OPTIONS = (  # each script's --device=tpu runs in a new python: test_a_bad_option_as_a_user_meets_it
    [(s, "--batch_size=0") for s in TRAINERS] + [(s, "--lr=-1") for s in TRAINERS]
    + [(s, "--eval_interval=0") for s in ("sft", "reward", "dpo", "pretrain")]
    + [(s, "--grad_accum=0") for s in ("sft", "dpo", "pretrain")] + [("sft", "--length_groups=0")]
    + [("ppo", "--minibatch_size=0"), ("ppo", "--ppo_epochs=0"), ("ppo", "--eval_samples=0"),
       ("dpo", "--eval_samples=0"), ("ppo", "--temperature=0"), ("ppo", "--beta=-0.1"),
       ("dpo", "--beta=-0.1"), ("ppo", "--minibatch_size=999"), ("sft", "--max_iters=0"),
       ("pretrain", "--max_iters=0"), ("evaluate", "--samples=0"), ("chat", "--temperature=-1"),
       ("ppo", "--cliprange=0"), ("dpo", "--label_smoothing=0.5"), ("reward", "--K=1"),
       ("sft", "--dropout=1.5"), ("grpo", "--group_size=1"), ("grpo", "--baseline=ppo"),
       ("grpo", "--adv_eps=0"), ("grpo", "--minibatch_size=999"),
       ("ppo", "--max_iters=0"), ("grpo", "--max_iters=0"),  # a fresh run would report SFT as the policy
       ("chat", "--temperature=1e-300"), ("evaluate", "--temperature=1e-300")]  # logits / t: inf, NaN
    + [(s, "--dtype=float64") for s in SCRIPTS]
    + [(s, "--max_new_tokens=0") for s in ("sft", "reward", "ppo", "grpo", "dpo", "evaluate", "chat")]
    + [(s, "--seed=-1") for s in SCRIPTS] + [("chat", f"--seed={2 ** 32}"), ("ppo", f"--seed={2 ** 31}")]
)


def run(script, *args, env=None):
    return subprocess.run([sys.executable, f"{script}.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def snapshot(d):
    """{relative path: sha256} of every file under d."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, d)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def one_line_error(r):
    lines = r.stderr.strip().splitlines()
    return (r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ")
            and "Traceback" not in r.stderr)


def save_tiny(path, kind="sft", **changes):
    torch.manual_seed(0)
    args = dict(block_size=64, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32,
                scalar_head=kind == "reward")
    m = M.GPT(M.GPTConfig(**args))
    ck = {"model": m.state_dict(), "model_args": args, "kind": kind, "step": 1, "tokenizer": "world",
          "gain": 1.0, "bias": 0.0, **changes}
    runtime.save_checkpoint(str(path), ck)
    return ck


@pytest.fixture
def out_dir(tmp_path):
    """An out_dir with a previous run's files in it: none of them may change when a command is refused."""
    d = tmp_path / "out"
    d.mkdir()
    for kind in ("base", "sft", "ppo", "dpo"):
        save_tiny(d / f"{kind}.pt", kind)
    save_tiny(d / "reward.pt", "reward")
    for name in ("pretrain", "sft", "reward", "ppo", "dpo"):
        (d / f"{name}.jsonl").write_text('{"iter": 1, "loss": 1.0}\n')
    (d / "comparisons.jsonl").write_text('{"not": "read"}\n')
    return d


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_option_as_a_user_meets_it(out_dir, script):
    """Once per script in a new python: one line on stderr, no traceback, a non-zero exit, nothing touched."""
    before = snapshot(out_dir)
    r = run(script, f"--out_dir={out_dir}", "--device=tpu")
    assert one_line_error(r), r.stderr[-1500:]
    assert r.stderr.startswith("error: --device='tpu' is out of range")  # the line names the option
    assert snapshot(out_dir) == before


@pytest.mark.parametrize("script,option", BAD_OPTIONS, ids=[f"{s}{o}" for s, o in BAD_OPTIONS])
def test_a_bad_option_is_one_line_and_touches_nothing(out_dir, refusal, script, option):
    before = snapshot(out_dir)
    message = refusal(script, f"--out_dir={out_dir}", option)
    assert message.startswith("error: ") and "\n" not in message, message
    # the line names the option and its range (an unknown option's line would name it too)
    assert message.startswith(f"error: {option.split('=')[0]}=") and "is out of range" in message, message
    assert snapshot(out_dir) == before


def test_bench_with_a_bad_option_as_a_user_meets_it():
    r = run("bench", "--device=tpu")  # bench writes nothing; the rest of its checks run in-process
    assert one_line_error(r) and r.stderr.startswith("error: --device='tpu' is out of range"), r.stderr


def test_an_undecodable_file_name_is_printed_escaped_under_a_strict_utf8_locale():
    """argv's bytes that the locale cannot decode become lone surrogates; under a UTF-8 locale whose stdout is
    strict, the first print of such a path (ppo.py's prompt file, evaluate.py's closing line) was a crash."""
    code = "import runtime; runtime.configure({}, argv=[]); print('prompts from p\\udcff.jsonl')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert r.returncode == 0 and r.stdout == b"prompts from p\\udcff.jsonl\n", r.stderr[-1500:]


@pytest.mark.parametrize("script", ["pretrain", "sft", "dpo", "ppo", "grpo"])
def test_resume_from_a_checkpoint_without_its_optimizer_is_one_line(out_dir, refusal, script):
    """A checkpoint that holds a model but not what --resume needs (an optimizer, the loss scale, the RNG
    streams) once stopped with a KeyError traceback in restore(): it is refused in one line, before anything
    else is read or built, and nothing is touched."""
    name = {"pretrain": "base", "grpo": "grpo"}.get(script, script)
    if script == "grpo":
        save_tiny(out_dir / "grpo.pt", "grpo")
    before = snapshot(out_dir)
    message = refusal(script, f"--out_dir={out_dir}", "--resume=True")
    assert message.startswith(f"error: {out_dir / f'{name}.pt'} has no optimizer, scaler, rng"), message
    assert message.endswith("not a complete checkpoint; start afresh without --resume"), message
    assert snapshot(out_dir) == before


@pytest.mark.parametrize("field, value, says", [
    ("step", "x", "damaged step"), ("step", 2.5, "damaged step"), ("step", -1, "damaged step"),
    ("optimizer", {}, "damaged optimizer"), ("rng", {}, "damaged rng"), ("scaler", None, "damaged scaler"),
    ("optimizer", {"state": {}, "param_groups": [{}, {}]}, "the checkpoint's optimizer does not fit"),
    ("rng", {"python": 1, "numpy": 2, "torch": 3}, "the checkpoint's RNG state is damaged")])
def test_resume_from_a_checkpoint_whose_resume_fields_are_damaged_is_one_line(out_dir, refusal, field, value,
                                                                               says):
    """Present but of the wrong type or shape (a hand-edited or foreign checkpoint): each was a traceback,
    and a step that was not a number emptied the stage's log first."""
    m = M.GPT(M.GPTConfig(block_size=64, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32))
    opt = runtime.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.95), "cpu")
    state = runtime.training_state(m, opt, torch.amp.GradScaler("cpu", enabled=False))
    save_tiny(out_dir / "sft.pt", "sft", **{**state, "config": {}, field: value})
    before = snapshot(out_dir)
    message = refusal("sft", f"--out_dir={out_dir}", "--resume=True")
    assert message.startswith("error: ") and says in message and "\n" not in message, message
    assert snapshot(out_dir) == before


def test_an_fp16_resume_from_a_damaged_loss_scale_is_one_line():
    """An fp16 run reads the checkpoint's GradScaler state back: one without its scale (a hand-edited file)
    was a KeyError traceback from inside torch."""
    m = M.GPT(M.GPTConfig(block_size=64, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32))
    opt = runtime.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.95), "cpu")
    state = runtime.training_state(m, opt, torch.amp.GradScaler("cpu", enabled=True))
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert runtime.restore({**state, "step": 3}, m, opt, scaler) == 3  # the saved state itself loads
    damaged = r"^error: --resume: the checkpoint's loss scale is damaged \(KeyError\)"
    with pytest.raises(SystemExit, match=damaged):
        runtime.restore({**state, "scaler": {"growth": 2.0}, "step": 3}, m, opt, scaler)


@pytest.mark.parametrize("changes, says", [
    ({"rank_rng": [1, 2]}, "damaged rank_rng"), ({"kl_coef": float("nan")}, "damaged kl_coef"),
    ({"kl_coef": float("inf")}, "damaged kl_coef"), ({"kl_coef": -0.1}, "damaged kl_coef"),
    ({"rank_rng": [{"prompts": [1, 2]}]}, "the checkpoint's rank_rng is damaged (TypeError)")])
def test_resume_with_damaged_per_rank_samplers_or_kl_coefficient_is_one_line(out_dir, refusal, changes, says):
    """ppo.py (and grpo.py) also resume each rank's prompt sampler and, with --target_kl, the adapted beta."""
    m = M.GPT(M.GPTConfig(block_size=64, vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32,
                          scalar_head=True))
    head = list(m.scalar_head.parameters())  # ppo.py's two groups: the trunk, the value head
    opt = torch.optim.AdamW([{"params": [p for p in m.parameters() if all(p is not h for h in head)]},
                             {"params": head}])
    state = runtime.training_state(m, opt, torch.amp.GradScaler("cpu", enabled=False))
    good = {"prompts": random.Random(0).getstate(), "torch": torch.get_rng_state()}
    save_tiny(out_dir / "ppo.pt", "ppo", **{**state, "config": {}, "rank_rng": [good], "kl_coef": 0.05,
                                            **changes})
    before = snapshot(out_dir)
    message = refusal("ppo", f"--out_dir={out_dir}", "--resume=True", "--max_iters=3", "--max_new_tokens=8")
    assert message.startswith("error: ") and says in message and "\n" not in message, message
    assert snapshot(out_dir) == before


def test_a_resumed_log_drops_a_line_nested_too_deeply_as_any_damaged_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"iter": 1}\n' + "[" * 100_000 + "]" * 100_000 + '\n{"iter": 2}\n{"iter": 4}\n')
    runtime.start_log(str(path), 3)  # a RecursionError traceback, where a damaged line costs only itself
    assert path.read_text() == '{"iter": 1}\n{"iter": 2}\n'


def test_a_resumed_log_must_begin_as_the_checkpoint_recorded_it(tmp_path):
    """training_state records the log's size and hash as the checkpoint is saved. A killed run's later rows
    are cut as before; a log a later fresh run started (it removed this run's log and was killed before its
    first checkpoint) was spliced with the old checkpoint's steps: now one line, the log untouched."""
    path = tmp_path / "sft.jsonl"
    path.write_text('{"iter": 1}\n{"iter": 2}\n')
    m = M.GPT(M.GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    opt = runtime.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.95), "cpu")
    ck = {**runtime.training_state(m, opt, torch.amp.GradScaler("cpu", enabled=False), str(path)), "step": 2}
    assert ck["log"][0] == len(path.read_bytes())
    with open(path, "a") as f:
        f.write('{"iter": 3}\n{"iter": 4, "lo')  # logged after the checkpoint, the last row cut by a kill
    runtime.start_log(str(path), 2, ck)
    assert path.read_text() == '{"iter": 1}\n{"iter": 2}\n'
    path.write_text('{"iter": 1, "loss": 9.0}\n')  # a later fresh run's first row
    with pytest.raises(SystemExit, match=r"^error: --resume: .*sft\.jsonl is the log of a later run than "
                                         r"the checkpoint \(one stopped before its first checkpoint\); "
                                         r"start afresh"):
        runtime.start_log(str(path), 2, ck)
    assert path.read_text() == '{"iter": 1, "loss": 9.0}\n'
    path.unlink()
    runtime.start_log(str(path), 2, ck)  # no log at all: nothing to splice, the resumed run starts one
    assert not path.exists()


def test_a_resumed_log_whose_rewrite_fails_partway_is_kept_whole_and_leaves_no_temporary_file(tmp_path):
    """The kept rows go to a temporary file that replaces the log only once written: a write stopped partway
    (here a 30-byte file size limit, EFBIG, as a full disk would stop it) is one line, and the old log stays
    as it was, where writing the log in place would have cut it to those 30 bytes."""
    path = tmp_path / "sft.jsonl"
    old = "".join(json.dumps({"iter": i, "loss": 2.5}) + "\n" for i in (1, 2, 3))
    path.write_text(old)
    code = (f"import resource, signal, sys; sys.path.insert(0, {ROOT!r}); import runtime\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), no kill\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (30, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            f"runtime.start_log({str(path)!r}, 2)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == f"error: could not write {path} (File too large)", r.stderr
    assert path.read_text() == old and os.listdir(tmp_path) == ["sft.jsonl"]
    runtime.start_log(str(path), 2)  # no limit: the two rows up to step 2 are kept
    assert path.read_text() == old[:old.index('{"iter": 3')] and os.listdir(tmp_path) == ["sft.jsonl"]


def test_a_checkpoint_saved_before_its_log_exists_resumes_with_the_rows_up_to_its_step(tmp_path):
    """No log yet when the checkpoint is saved: it records none (no crash), and a resumed run keeps the rows
    up to its step. A fresh run (no resumed step) starts a fresh log whatever checkpoint it is handed."""
    path = tmp_path / "sft.jsonl"
    m = M.GPT(M.GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    opt = runtime.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.95), "cpu")
    ck = {**runtime.training_state(m, opt, torch.amp.GradScaler("cpu", enabled=False), str(path)), "step": 2}
    assert ck["log"] is None and not path.exists()
    path.write_text('{"iter": 1}\n{"iter": 2}\n{"iter": 3}\n')
    runtime.start_log(str(path), 2, ck)
    assert path.read_text() == '{"iter": 1}\n{"iter": 2}\n'
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    marked = {**runtime.training_state(m, opt, scaler, str(path)), "step": 2}
    path.write_text('{"iter": 1, "loss": 9.0}\n')  # another run's log: no matter, this run starts afresh
    runtime.start_log(str(path), None, marked)
    assert not path.exists()


def test_a_log_or_temporary_file_path_with_a_directory_in_it_is_one_line(tmp_path):
    """A directory where the stage's log goes (fresh or resumed), or where save_checkpoint writes its
    temporary file: tracebacks, the second from the cleanup of the failed write hiding the first."""
    (tmp_path / "sft.jsonl").mkdir()
    for resumed in (None, 3):
        with pytest.raises(SystemExit, match=r"^error: could not write .*sft\.jsonl \(Is a directory\)$"):
            runtime.start_log(str(tmp_path / "sft.jsonl"), resumed)
    path = str(tmp_path / "sft.pt")
    ck = save_tiny(path)
    (tmp_path / "sft.pt.tmp").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit, match=r"^error: could not write .*sft\.pt \(Is a directory\); the old"):
        runtime.save_checkpoint(path, {**ck, "step": 2})
    assert snapshot(tmp_path) == before and (tmp_path / "sft.pt.tmp").is_dir()


def test_a_reward_model_whose_normalisation_is_not_a_finite_number_is_one_line(out_dir, refusal):
    """gain, bias and lm_weight multiply every score: a NaN made PPO stop at its first step blaming --lr
    (after it had replaced the previous run's log), a string was a traceback."""
    for field, value in [("gain", float("nan")), ("lm_weight", float("inf")), ("gain", "abc"), ("bias", None),
                         ("gain", 0.0)]:
        save_tiny(out_dir / "reward.pt", "reward", normalised=True, **{field: value})
        before = snapshot(out_dir)
        message = refusal("ppo", f"--out_dir={out_dir}", "--max_iters=1")
        assert message.startswith(f"error: {out_dir / 'reward.pt'}: its gain, bias and lm_weight ("), message
        assert message.endswith("are not finite numbers with gain > 0: not a usable reward model"), message
        assert snapshot(out_dir) == before


def damaged_checkpoints(d):
    """(name, path) of checkpoints that must be refused in one line."""
    d.mkdir(exist_ok=True)
    good = save_tiny(d / "good.pt", "sft")
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(os.urandom(4096))
    (d / "truncated.pt").write_bytes((d / "good.pt").read_bytes()[:3000])
    save_tiny(d / "wrong_kind.pt", "reward")
    torch.save({k: v for k, v in good.items() if k != "model_args"}, d / "no_model_args.pt")
    torch.save({**good, "model_args": {**good["model_args"], "n_embd": 64}}, d / "other_shape.pt")
    torch.save({**good, "model_args": {**good["model_args"], "vocab_size": 100},
                "model": {**good["model"], "transformer.wte.weight": torch.zeros(100, 32)}},
               d / "other_vocab.pt")
    torch.save(torch.zeros(3), d / "a_tensor.pt")
    text_vocab = {**good["model_args"], "vocab_size": str(N_VOCAB)}  # a number as text: not comparable
    torch.save({**good, "model_args": text_vocab}, d / "vocab_text.pt")

    class Exploit:  # a pickle that would run code when loaded without weights_only
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))
    with open(d / "exploit.pt", "wb") as f:
        pickle.dump({"kind": "sft", "model": Exploit()}, f)
    names = ["empty", "random", "truncated", "wrong_kind", "no_model_args", "other_shape", "other_vocab",
             "a_tensor", "vocab_text", "exploit"]
    return [(n, d / f"{n}.pt") for n in names]


def test_damaged_checkpoints_are_one_line_and_run_no_code(tmp_path, refusal):
    for name, path in damaged_checkpoints(tmp_path / "ck"):
        message = refusal("chat", f"--ckpt={path}", "--prompt=Describe the owl.", "--max_new_tokens=4")
        assert message.startswith("error: ") and "\n" not in message, (name, message)
        assert str(path) in message, name  # the line names the file
        assert "weights_only" not in message, (name, message)  # not torch's advice to load it unsafely
    assert not (tmp_path / "ck" / "PWNED").exists()


@pytest.mark.parametrize("stage", ["ppo", "dpo", "reward"])
def test_a_damaged_sft_checkpoint_stops_a_later_stage_in_one_line(tmp_path, refusal, stage):
    d = tmp_path / "out"
    d.mkdir()
    cks = dict(damaged_checkpoints(tmp_path / "ck"))
    for name in ("other_vocab", "truncated"):
        (d / "sft.pt").write_bytes(cks[name].read_bytes())
        save_tiny(d / "reward.pt", "reward")
        ranking = {"prompt": [{"role": "user", "content": "Describe the owl."}], "ranking": [0, 1],
                   "responses": ["The owl is kind.", "No."], "ended": [True, True]}
        (d / "comparisons.jsonl").write_text(json.dumps(ranking) + "\n")  # good: only sft.pt is wrong
        before = snapshot(d)
        message = refusal(stage, f"--out_dir={d}", "--max_iters=1")
        assert message.startswith(f"error: {d / 'sft.pt'}") and "\n" not in message, (stage, name, message)
        assert snapshot(d) == before


@pytest.mark.parametrize("stage", ["ppo", "grpo", "dpo"])
def test_a_reward_model_that_cannot_score_the_sft_models_answers_is_one_line(tmp_path, refusal, stage):
    """reward.pt of another tokenizer than sft.pt (it would score ids that mean other text: noise), or with
    no reward head (a constant score): one line before any training, nothing touched."""
    d = tmp_path / "out"
    d.mkdir()
    save_tiny(d / "sft.pt", "sft")
    ranking = {"prompt": [{"role": "user", "content": "Describe the owl."}], "ranking": [0, 1],
               "responses": ["The owl is kind.", "No."], "ended": [True, True]}
    (d / "comparisons.jsonl").write_text(json.dumps(ranking) + "\n")
    for weights, changes, why in [("reward", {"tokenizer": "gpt2"}, "is another network than the SFT model "
                                   "(tokenizer gpt2 vs world)"), ("sft", {}, "has no reward head")]:
        ck = save_tiny(d / "reward.pt", weights, **changes)  # "sft": a language model saved as a reward model
        runtime.save_checkpoint(str(d / "reward.pt"), {**ck, "kind": "reward"})
        before = snapshot(d)
        message = refusal(stage, f"--out_dir={d}", "--max_iters=1", *["--online_rounds=1"] * (stage == "dpo"))
        assert message.startswith(f"error: {d / 'reward.pt'} {why}") and "\n" not in message, message
        assert snapshot(d) == before


@pytest.mark.parametrize("stage", ["ppo", "grpo", "dpo", "reward"])
def test_a_reward_model_of_an_earlier_sft_model_of_the_same_network_is_one_line(tmp_path, refusal, stage):
    """sft.py run again (another seed, more steps) leaves reward.pt from the old weights: same shape, so it
    loaded, and scored the new model's answers with the old one's normalisation. The fingerprint of the SFT
    weights it stores says so; a reward.pt from before the fingerprint, or of this very SFT model, passes."""
    d = tmp_path / "out"
    d.mkdir()
    sft = save_tiny(d / "sft.pt", "sft")
    rankings = [{"prompt": [{"role": "user", "content": f"Describe the {a}."}], "ranking": [0, 1],
                 "responses": [f"The {a} is kind.", "No."], "ended": [True, True]} for a in world.ANIMALS]
    (d / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    m = M.GPT(M.GPTConfig(**{**sft["model_args"], "scalar_head": True}))
    opt = runtime.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.95), "cpu")
    state = runtime.training_state(m, opt, torch.amp.GradScaler("cpu", enabled=False))
    torch.manual_seed(1)
    other = M.GPT(M.GPTConfig(**sft["model_args"])).state_dict()  # the same network, other weights
    save_tiny(d / "reward.pt", "reward", normalised=True, sft_fingerprint=runtime.fingerprint(other), **state)
    before = snapshot(d)
    args = ["--resume=True"] if stage == "reward" else ["--online_rounds=1"] * (stage == "dpo")
    message = refusal(stage, f"--out_dir={d}", "--max_iters=1", *args)
    assert message == (f"error: {d / 'reward.pt'} was trained from another SFT model (the same network, "
                       "other weights: was sft.py run again?); train it anew with "
                       f"`python reward.py --out_dir={d}`")
    assert snapshot(d) == before
    rm_ck = torch.load(d / "reward.pt", weights_only=True)
    for fp in (runtime.fingerprint(sft["model"]), None):
        runtime.trained_from("reward.pt", {**rm_ck, "sft_fingerprint": fp}, sft)  # passes


@pytest.mark.parametrize("stage", ["ppo", "grpo", "dpo"])
def test_resuming_a_policy_tuned_from_an_earlier_sft_model_of_the_same_network_is_one_line(out_dir, refusal,
                                                                                          stage):
    """sft.py run again, then ppo.py (grpo.py, dpo.py) --resume=True: the policy tuned from the old SFT model
    continued against the new one as its KL reference, with a log whose rows measured the KL from the old.
    A tuned policy stores its SFT model's fingerprint, as the reward model does; one of this very SFT model,
    or from before the fingerprint, resumes."""
    rankings = [{"prompt": [{"role": "user", "content": f"Describe the {a}."}], "ranking": [0, 1],
                 "responses": [f"The {a} is kind.", "No."], "ended": [True, True]} for a in world.ANIMALS]
    (out_dir / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rankings))
    sft = torch.load(out_dir / "sft.pt", weights_only=True)
    m = M.GPT(M.GPTConfig(**sft["model_args"]))
    opt = runtime.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.95), "cpu")
    state = runtime.training_state(m, opt, torch.amp.GradScaler("cpu", enabled=False))
    torch.manual_seed(1)
    other = M.GPT(M.GPTConfig(**sft["model_args"])).state_dict()  # the same network, other weights
    good = {"prompts": random.Random(0).getstate(), "torch": torch.get_rng_state()}
    save_tiny(out_dir / f"{stage}.pt", stage, **{**state, "config": {}, "rank_rng": [good], "kl_coef": 0.05,
                                                 "sft_fingerprint": runtime.fingerprint(other)})
    before = snapshot(out_dir)
    message = refusal(stage, f"--out_dir={out_dir}", "--resume=True", "--max_iters=3", "--max_new_tokens=8")
    assert message == (f"error: {out_dir / (stage + '.pt')} was trained from another SFT model (the same "
                       "network, other weights: was sft.py run again?); start afresh without --resume")
    assert snapshot(out_dir) == before


def test_the_fingerprint_reads_the_weights_not_their_names_prefixes(tmp_path):
    sd = M.GPT(M.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=8)).state_dict()
    fp = runtime.fingerprint(sd)
    assert runtime.fingerprint({f"_orig_mod.module.{k}": v for k, v in sd.items()}) == fp  # compiled, DDP
    sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    sd["lm_head.weight"][0, 0] = torch.nextafter(sd["lm_head.weight"][0, 0], torch.tensor(1.0))  # one ulp
    assert runtime.fingerprint(sd) != fp


def test_no_checkpoint_with_a_nan_is_ever_written(tmp_path):
    path = str(tmp_path / "sft.pt")
    good = save_tiny(path)
    before = snapshot(tmp_path)
    broken = {k: v.clone() for k, v in good["model"].items()}
    broken["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    with pytest.raises(SystemExit, match="not finite"):
        runtime.save_checkpoint(path, {**good, "model": broken})
    broken["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("inf")
    with pytest.raises(SystemExit, match="not finite"):
        runtime.save_checkpoint(path, {**good, "model": broken})
    assert snapshot(tmp_path) == before  # the good checkpoint is untouched, no temporary file


@pytest.mark.parametrize("room", [0, 1000, 50_000])
def test_a_full_disk_keeps_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch, room):
    """The real torch.save into a file whose disk fills after `room` bytes: torch reports the failed write as
    a RuntimeError ("unexpected pos") raised while handling the OSError; the line still says why."""
    path = str(tmp_path / "sft.pt")
    ck = save_tiny(path)
    before = snapshot(tmp_path)
    real_open = open

    class FullDisk:  # a file on a disk with `room` bytes left: a write past them fails as the OS's would
        def __init__(self, *args, **kwargs):
            self.f, self.room = real_open(*args, **kwargs), room

        def write(self, b):
            if len(b) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
    monkeypatch.setattr(runtime, "open", FullDisk, raising=False)  # the open save_checkpoint calls
    with pytest.raises(SystemExit, match=r"could not write .*\(No space left on device\)"):
        runtime.save_checkpoint(path, {**ck, "step": 2})
    assert snapshot(tmp_path) == before
    monkeypatch.undo()

    def broken_save(obj, f):  # a RuntimeError that no failed write caused: a bug, not to be hidden
        f.write(b"half a checkpoint")
        raise RuntimeError("not a disk problem")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="not a disk problem"):
        runtime.save_checkpoint(path, {**ck, "step": 2})
    assert snapshot(tmp_path) == before  # and still no temporary file


def test_a_missing_stage_is_built_where_the_caller_looks(tmp_path, monkeypatch, capsys):
    """`python /path/to/ppo.py` run from another directory: the stage it runs to make out/sft.pt must write
    into the out/ of that directory, where the caller then looks (a stand-in stage, a real one is slow)."""
    stage = tmp_path / "stage.py"
    stage.write_text(
        "import os, sys\n"
        "out = next((a[10:] for a in sys.argv[1:] if a.startswith('--out_dir=')), 'out')\n"
        "if not os.path.samefile(os.getcwd(), os.environ['CALLER_DIR']):\n"
        "    sys.exit(f'ran in {os.getcwd()}')  # writes nothing where the caller would not look\n"
        "os.makedirs(out, exist_ok=True)\n"
        "open(os.path.join(out, 'made.pt'), 'wb').close()\n")
    caller = tmp_path / "elsewhere"
    caller.mkdir()
    monkeypatch.chdir(caller)
    monkeypatch.setenv("CALLER_DIR", str(caller))
    for out_dir in ("out", os.path.join("runs", "a")):
        runtime.ensure_checkpoint(os.path.join(out_dir, "made.pt"), str(stage), out_dir)
        assert (caller / out_dir / "made.pt").is_file()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"{os.path.join('out', 'made.pt')} not found: running `python {stage}` to make it"
    assert printed[1].endswith(f"running `python {stage} --out_dir=runs/a` to make it")
    with pytest.raises(SystemExit, match="did not produce"):  # a stage that fails is one line
        runtime.ensure_checkpoint(os.path.join("other", "made.pt"), str(stage), "out")
    runtime.ensure_checkpoint(os.path.join("out", "made.pt"), str(stage), "./out/")  # there: nothing to run
    os.remove(caller / "out" / "made.pt")
    runtime.ensure_checkpoint(os.path.join("out", "made.pt"), str(stage), "./out/")  # the default, spelt so
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"running `python {stage}` to make it")


def test_under_torchrun_the_wait_for_a_missing_input_outlasts_the_default_groups_timeout(tmp_path):
    """Rank 0 builds a missing input while the others wait. They waited at a barrier of the default group,
    whose timeout (gloo's 30 minutes, NCCL's 10) a slow machine's build can outlast; here that timeout is 2 s
    and a stand-in stage takes 4 s: both ranks get past the wait, and the default group still works."""
    stage = tmp_path / "slow.py"
    stage.write_text("import os, sys, time\n"
                     "time.sleep(4)\n"
                     "out = next(a[10:] for a in sys.argv[1:] if a.startswith('--out_dir='))\n"
                     "open(os.path.join(out, 'made.pt'), 'wb').close()\n")
    script = tmp_path / "wait.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {ROOT!r})\n"
                      "from datetime import timedelta\n"
                      "import torch.distributed as dist\n"
                      "import runtime\n"
                      "dist.init_process_group('gloo', timeout=timedelta(seconds=2))\n"
                      "runtime.ensure_checkpoint(sys.argv[1], sys.argv[2], os.path.dirname(sys.argv[1]))\n"
                      "dist.barrier()\n"
                      "open(f'past{dist.get_rank()}', 'w').close()\n"
                      "dist.destroy_process_group()\n")
    (tmp_path / "out").mkdir()
    t0 = time.time()
    r = subprocess.run([*torchrun_launcher(), str(script), str(tmp_path / "out" / "made.pt"), str(stage)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "past0").is_file() and (tmp_path / "past1").is_file()
    assert time.time() - t0 > 4 and (tmp_path / "out" / "made.pt").is_file()


def test_a_device_this_machine_lacks_is_one_line(refusal, tmp_path, monkeypatch):
    """--device=cuda (or mps) where there is none stops in setup, before anything is read or written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    save_tiny(tmp_path / "sft.pt")
    before = snapshot(tmp_path)
    for device in ("cuda", "cuda:0", "mps"):
        message = refusal("chat", f"--out_dir={tmp_path}", f"--device={device}", "--prompt=Hi")
        assert message.startswith(f"error: --device={device} is not available") and "\n" not in message
    assert snapshot(tmp_path) == before
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU: cuda:0 is there, cuda:1 is not
    with pytest.raises(SystemExit, match="--device=cuda:1 is not available"):
        runtime.setup("cuda:1")
    assert runtime.setup("cpu").device == "cpu"


def test_the_chosen_gpu_is_made_current_and_torchrun_needs_one_per_process(monkeypatch, no_tf32):
    """--device=cuda:N becomes the current GPU (synchronize() and the bf16 check read the current one), and a
    torchrun process with no GPU of its own is one line, not CUDA's "invalid device ordinal" traceback. CUDA
    is stood in: two GPUs, set_device recorded."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert runtime.setup("cuda:1", "float32").device == "cuda:1" and chosen == [1]
    for name, value in {"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match="^error: --device=cuda:2 is not available on this machine; try "
                                         "--device=auto and at most one process per GPU$"):
        runtime.setup("auto", "float32")
    assert chosen == [1]


def test_a_prompt_file_with_a_prompt_too_long_for_the_model_names_its_line(tmp_path):
    from data.chat import render_prompt
    from rollout import prompts_fit, training_prompts
    enc = get_tokenizer("world")
    path = tmp_path / "prompts.jsonl"
    long = " ".join(["Describe the owl."] * 20)
    path.write_text(json.dumps({"prompt": "Describe the owl."}) + "\n\n"  # line 2 is blank: no prompt
                    + json.dumps({"messages": [{"role": "user", "content": long}]}) + "\n")
    prompts = training_prompts(str(path))
    n = len(render_prompt(enc, prompts[1]))
    prompts_fit(str(path), prompts, enc, n + 8, 8)  # room for the whole reply: fine
    with pytest.raises(SystemExit) as e:  # one token short: the reply (and its batch's) would be cut
        prompts_fit(str(path), prompts, enc, n + 7, 8)
    assert str(e.value).startswith(f"error: {path}:3: the prompt is {n} tokens") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:  # the world's prompts (no file) are checked too, without a line
        prompts_fit("", [[{"role": "user", "content": long}]], enc, n + 7, 8)
    assert str(e.value).startswith(f"error: a world prompt is {n} tokens") and "\n" not in str(e.value)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_as_data_is_read_like_a_file_by_pretrain_and_dpo(tmp_path, refusal):
    """reward.py and sft.py read --data=<(...) while pretrain.py said "not found" and dpo.py "out of range: it
    must be a preference file that exists"; each reads its file once, so a pipe serves as well."""
    import threading
    from pretrain import read_documents
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for content, read in (("The owl is kind.\n\nThe fox is red.\n", lambda: read_documents(str(fifo))),
                          ("not json\n", lambda: refusal("dpo", f"--out_dir={tmp_path}", f"--data={fifo}"))):
        writer = threading.Thread(target=lambda: fifo.write_text(content), daemon=True)
        writer.start()
        got = read()
        writer.join(timeout=30)  # (a reader that never opened the pipe leaves the writer waiting: no hang)
        assert got == ["The owl is kind.", "The fox is red."] or \
            got.startswith(f"error: {fifo}:1: invalid JSON")
    assert sorted(os.listdir(tmp_path)) == ["fifo"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_piped_prompt_file_with_a_prompt_too_long_is_one_line_naming_its_number(tmp_path):
    """--prompts=<(...) in a shell: the file was read a second time to name the prompt's line, found empty,
    and the one-line error became a DataError traceback."""
    import threading
    from data.chat import render_prompt
    from rollout import prompts_fit, training_prompts
    enc = get_tokenizer("world")
    long = " ".join(["Describe the owl."] * 20)
    fifo = tmp_path / "prompts"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(
        json.dumps({"prompt": "Describe the owl."}) + "\n" + json.dumps({"prompt": long}) + "\n"))
    writer.start()
    prompts = training_prompts(str(fifo))
    writer.join()
    # as a shell's pipe would, a second read finds nothing (here: it must not wait for a writer forever)
    threading.Thread(target=lambda: fifo.write_text(""), daemon=True).start()
    n = len(render_prompt(enc, prompts[1]))
    with pytest.raises(SystemExit) as e:
        prompts_fit(str(fifo), prompts, enc, n + 7, 8)
    assert str(e.value).startswith(f"error: {fifo}: prompt 2 is {n} tokens") and "\n" not in str(e.value)


def test_a_read_only_out_dir_is_one_line(tmp_path, monkeypatch):
    """The OS refuses the write (a read-only directory; root would be let in, so the refusal is stood in):
    one line saying why, the old checkpoint unchanged, no temporary file."""
    path = tmp_path / "x.pt"
    save_tiny(path)
    before = snapshot(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(runtime, "open", refuse, raising=False)  # the name save_checkpoint opens files by
    with pytest.raises(SystemExit, match=f"^error: could not write {re.escape(str(path))} "
                                         r"\(Permission denied\); the old file is unchanged$"):
        runtime.save_checkpoint(str(path), {"model": {}, "model_args": {}, "kind": "sft"})
    assert snapshot(tmp_path) == before


def test_check_finite_names_the_stage_step_and_quantity():
    runtime.check_finite("sft", 3, "a lower --lr", loss=torch.tensor(1.0), grad_norm=2.0)  # finite: nothing
    with pytest.raises(SystemExit, match=r"sft step 7: grad_norm is nan .* try a lower --lr"):
        runtime.check_finite("sft", 7, "a lower --lr", loss=1.0, grad_norm=float("nan"))
    with pytest.raises(SystemExit, match="rewards is inf"):
        runtime.check_finite("ppo", 1, "x", rewards=torch.tensor([0.0, float("inf")]))


def test_a_stopwatch_adds_each_lap_to_its_phase_and_the_rest_to_the_last():
    ticks = iter([10.0, 11.0, 13.0, 16.0, 20.0])  # the start, then one reading per lap
    watch = runtime.Stopwatch(clock=lambda: next(ticks))
    watch.lap("sampling")  # 1 s
    watch.lap("training")  # 2 s
    watch.lap("sampling")  # 3 s more: a phase's laps add up
    line = watch.report("ppo")  # the 4 s since the last lap are "other"
    assert watch.seconds == {"sampling": 4.0, "training": 2.0, "other": 4.0}
    assert line == "ppo time 10.0 s: sampling 4.0 s (40%), training 2.0 s (20%), other 4.0 s (40%)"
    assert time_split(line, "ppo") == {"sampling": 4.0, "training": 2.0, "other": 4.0}


def test_a_stopwatch_on_cuda_waits_for_the_queued_kernels_at_every_lap(monkeypatch):
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(1))
    watch = runtime.Stopwatch("cuda", clock=iter([0.0, 1.0, 2.0, 3.0]).__next__)
    watch.lap("sampling")
    watch.lap("training")
    assert len(syncs) == 2 and watch.report("ppo").startswith("ppo time 3.0 s") and len(syncs) == 3
    assert runtime.Stopwatch("cpu").lap("x") is None and len(syncs) == 3  # no CUDA call on a CPU


def test_scoring_replies_laps_sampling_then_scoring_then_the_hidden_human_per_chunk():
    from data import world
    from rollout import sample_and_grade
    torch.manual_seed(0)
    model = M.GPT(M.GPTConfig(vocab_size=N_VOCAB, n_layer=1, n_head=2, n_embd=32, block_size=96))
    laps = []
    res = sample_and_grade(model, get_tokenizer("world"), world.prompts("eval")[:3], 6, batch_size=2,
                           ref=model, lap=laps.append)
    assert laps == ["sampling", "scoring", "hidden human"] * 2 and res["n"] == 3  # two chunks of prompts


def test_matmul_flops_counts_two_flops_per_multiply_add(monkeypatch):
    ticks = iter([5.0, 7.0])  # the clock before and after the timed products
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(ticks))
    assert runtime.matmul_flops(torch.float32, n=4, iters=3) == 2 * 4 ** 3 * 3 / 2.0
    ticks = iter([0.3 * k for k in range(20)])  # each read of the clock 0.3 s after the one before
    monkeypatch.setattr(runtime.time, "perf_counter", lambda: next(ticks))
    # 2 products untimed by the loop, then one after each read that is under 1 s (0.3, 0.6, 0.9); 1.2 stops it
    assert runtime.matmul_flops(torch.float32, n=4, iters=2, min_seconds=1.0) == pytest.approx(
        2 * 4 ** 3 * 5 / 1.5)
    monkeypatch.undo()
    assert 0 < runtime.matmul_flops(torch.float32) < float("inf")  # and on the real clock


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_on_a_cpu_without_its_units_warns_in_one_line(monkeypatch, capsys, dtype):
    speeds = {torch.float32: 80e9, torch.bfloat16: 20e9, torch.float16: 1e9}  # as a CPU that emulates them
    monkeypatch.setattr(runtime, "matmul_flops", lambda ptdtype, *a, **k: speeds[ptdtype])
    rt = runtime.setup("cpu", dtype)
    err = capsys.readouterr().err.strip().splitlines()
    assert rt.dtype == dtype and len(err) == 1  # a warning, not a refusal
    assert err[0].startswith(f"warning: this CPU has no {dtype} units") and "--dtype=float32" in err[0]
    low = speeds[getattr(torch, dtype)]
    for speeds[torch.float32] in (0.5e9, low * 1.05):  # a CPU with those units (AMX): the low
        runtime.setup("cpu", dtype)  # precision wins, or ties a probe this small (seen: bf16 164, fp32 167)
        assert capsys.readouterr().err == ""


def test_float32_on_a_cpu_times_no_matmul(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "matmul_flops", lambda *a, **k: pytest.fail("timed a matmul"))
    for dtype in ("float32", "auto"):
        assert runtime.setup("cpu", dtype).dtype == "float32"
    assert capsys.readouterr().err == ""


def time_split(stdout, stage):
    """The phases of a stage's closing "<stage> time T s: phase S s (P%), ..." line, checked to add up to T
    (each figure rounded to 0.1 s)."""
    line = next(x for x in stdout.splitlines() if x.startswith(f"{stage} time "))
    total, parts = re.fullmatch(rf"{stage} time ([0-9.]+) s: (.*)", line).groups()
    phases = {m[1]: float(m[2]) for m in re.finditer(r"([^,]+?) ([0-9.]+) s \(\d+%\)(?:, |$)", parts)}
    assert abs(sum(phases.values()) - float(total)) <= 0.05 * (len(phases) + 1), line
    return phases


def fp16_step(model, loss_fn):
    """One training step as every stage takes it: fp16 autocast on CPU, the GradScaler,
    runtime.optimizer_step. Returns (weights before, weights after, the gradient norm)."""
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    opt = runtime.configure_optimizer(model, 0.0, 1e-3, (0.9, 0.95), "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        loss = loss_fn(model)
    assert loss.dtype == torch.float32  # losses stay fp32 under autocast
    scaler.scale(loss).backward()
    norm = runtime.optimizer_step(model, opt, scaler, 1.0)
    return before, model.state_dict(), norm


def test_the_fp16_step_returns_the_true_gradient_norm_and_zero_when_it_skips():
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 50, (4, 12))

    def loss_fn(net):
        return net(x[:, :-1], x[:, 1:])[1]
    with torch.autocast(device_type="cpu", dtype=torch.float16):
        loss_fn(m).backward()  # the same gradients, unscaled
    true = torch.stack([p.grad.norm() for p in m.parameters() if p.grad is not None]).norm()
    m.zero_grad(set_to_none=True)
    _, _, norm = fp16_step(m, loss_fn)
    assert norm > 0 and torch.allclose(norm, true, rtol=1e-3), (norm, true)  # not the scaled norm, not 0
    # an overflow: the scaler skips the step, and the norm is 0 so that the stage's check_finite goes on
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    opt = runtime.configure_optimizer(m, 0.0, 1e-3, (0.9, 0.95), "cpu")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    scaler.scale(loss_fn(m)).backward()
    next(m.parameters()).grad[0] = float("inf")
    norm = runtime.optimizer_step(m, opt, scaler, 1.0)
    assert norm.item() == 0.0 and scaler.get_scale() < 2.0 ** 16
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    runtime.check_finite("sft", 1, "x", grad_norm=norm)
    # without a scaler a non-finite norm is returned as it is: check_finite stops the stage
    off = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn(m).backward()
    next(m.parameters()).grad[0] = float("nan")
    with pytest.raises(SystemExit, match="grad_norm is nan"):
        runtime.check_finite("sft", 1, "x", grad_norm=runtime.optimizer_step(m, opt, off, 1.0))


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo", "grpo"])
def test_each_stage_steps_under_fp16_autocast_with_a_grad_scaler(stage):
    import dpo
    import grpo
    import pretrain
    import reward
    import sft
    from rollout import rm_score
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16,
                          scalar_head=stage == "reward"))
    x = torch.randint(0, 50, (4, 12))
    mask = torch.ones_like(x)
    loss_fn = {
        "pretrain": lambda net: pretrain.next_token_loss(net(x[:, :-1])[0], x[:, 1:]),
        "sft": lambda net: sft.sft_loss(net(x[:, :-1])[0],
                                        torch.where(torch.rand(4, 11) < 0.5, x[:, 1:], -1)),
        "reward": lambda net: reward.bradley_terry_loss(rm_score(net, x, mask).view(1, 4)),
        "dpo": lambda net: dpo.dpo_loss(*M.sequence_logprobs(net, x).sum(1).view(2, 2), torch.zeros(2),
                                        torch.zeros(2), 0.5).mean(),
        "grpo": lambda net: grpo.grpo_loss(lp := M.sequence_logprobs(net, x), lp.detach() + 0.01, lp.detach(),
                                           torch.tensor([1.0, -1.0, 0.5, -0.5]), mask[:, 1:].float(),
                                           0.2, 0.1),
    }[stage]
    before, after, norm = fp16_step(m, loss_fn)
    assert all(torch.isfinite(v).all() for v in after.values())
    moved = [k for k in after if not torch.equal(before[k], after[k])]
    assert moved, "the scaler skipped the step: no weight moved"


# --- a kill at a random moment, then --resume=True: the same rows and weights as an unbroken run
KILLED = {  # stage: (flags of an 8-step run that saves every 2 steps, inputs it needs)
    "sft": (["--batch_size=4", "--max_iters=8", "--eval_interval=2", "--eval_iters=1", "--max_new_tokens=8"],
            ["base"]),
    "reward": (["--batch_size=4", "--max_iters=8", "--eval_interval=2", "--n_prompts=40",
                "--max_new_tokens=4"],
               ["sft"]),
    "dpo": (["--batch_size=4", "--max_iters=8", "--eval_interval=2", "--max_new_tokens=8", "--n_eval=8"],
            ["sft", "comparisons"]),
    "ppo": (["--batch_size=4", "--minibatch_size=2", "--max_iters=8", "--save_interval=2",
             "--max_new_tokens=8", "--n_eval=4", "--eval_samples=1"], ["sft", "reward"]),
}


def stage_inputs(d, needs):
    d.mkdir()
    for kind in needs:
        if kind == "comparisons":
            rows = [{"prompt": [{"role": "user", "content": f"Describe the {a}."}],
                     "responses": [f"The {a} is red.", f"The {a} is sad.", "You are dumb."],
                     "ended": [True, True, False], "ranking": [0, 1, 2]}
                    for a in ("fox", "cat", "dog", "owl", "frog", "bird", "duck", "bear")]
            (d / "comparisons.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            save_tiny(d / f"{kind}.pt", kind, normalised=True)


def log_rows(path):
    """The complete rows of a jsonl log, without their wall-clock times."""
    rows = []
    for line in open(path) if os.path.exists(path) else []:
        try:
            rows.append({k: v for k, v in json.loads(line).items() if k != "time"})
        except ValueError:  # a line cut by the kill
            pass
    return rows


@pytest.mark.parametrize("stage", list(KILLED))
def test_a_kill_at_a_random_moment_then_resume_ends_as_an_unbroken_run(tmp_path, stage):
    flags, needs = KILLED[stage]
    whole, split = tmp_path / "whole", tmp_path / "split"
    for d in (whole, split):
        stage_inputs(d, needs)
    # one thread: with several, some CPU kernels may sum in another order from run to run, and the two runs
    # must sample the same answers (reward.py collects its comparisons by sampling) to end equal
    one = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run(stage, f"--out_dir={whole}", *flags, env=one)
    assert r.returncode == 0, r.stderr[-2000:]
    # SIGKILL once the log has k rows: after the first save (step 2) and before the last step, so the kill
    # lands mid-step, mid-save or mid-evaluation, with rows logged after the last checkpoint
    k = random.randint(3, 7)
    log = split / f"{stage}.jsonl"
    with open(split / "killed.log", "w") as out:
        p = subprocess.Popen([sys.executable, f"{stage}.py", f"--out_dir={split}", *flags], cwd=ROOT,
                             stdout=out, stderr=subprocess.STDOUT, env=one)
        deadline = time.time() + 300
        while len(log_rows(log)) < k and p.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL, f"the run ended before the kill after row {k}"
    r = run(stage, f"--out_dir={split}", *flags, "--resume=True", env=one)
    assert r.returncode == 0, (k, r.stderr[-2000:])
    same = lambda x, y: json.dumps(x, sort_keys=True) == json.dumps(y, sort_keys=True)  # NaN equals NaN here
    assert same(log_rows(whole / f"{stage}.jsonl"), log_rows(log)), k  # every row once, the same numbers
    a, b = (torch.load(d / f"{stage}.pt", weights_only=True) for d in (whole, split))
    metrics = [{n: v for n, v in ck.get("metrics", {}).items() if n != "time"} for ck in (a, b)]
    assert a["step"] == b["step"] and same(*metrics), k
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), (k, name)


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path, stage):
    """Ctrl-C (SIGINT) mid-run was a twenty-line KeyboardInterrupt traceback from wherever the run was. It is
    one line and exit status 130; the last checkpoint stays, and --resume=True continues from it."""
    flags, needs = KILLED[stage]
    d = tmp_path / "out"
    stage_inputs(d, needs)
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        # a shell starts a background job (`pytest ... &`) with SIGINT ignored, and python keeps it ignored:
        # the child takes Ctrl-C as it would from a terminal, whatever this process inherited
        p = subprocess.Popen([sys.executable, f"{stage}.py", f"--out_dir={d}", *flags], cwd=ROOT,
                             stdout=out, stderr=err,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 300
        while len(log_rows(d / f"{stage}.jsonl")) < 3 and p.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        p.send_signal(signal.SIGINT)
        p.wait()
    errors = (tmp_path / "err.log").read_text()
    assert p.returncode == 130 and "Traceback" not in errors, errors[-2000:]
    assert errors.strip().splitlines()[-1] == ("interrupted: a training stage continues from its last "
                                               "checkpoint with --resume=True")
    assert not list(d.glob("*.tmp"))  # no half-written checkpoint left beside the last one
    r = run(stage, f"--out_dir={d}", *flags, "--resume=True")
    assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr[-2000:]


def test_the_entry_point_turns_ctrl_c_into_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        runtime.run(interrupted)
    assert e.value.code == 130 and capsys.readouterr().err.strip().splitlines() == [
        "interrupted: a training stage continues from its last checkpoint with --resume=True"]
    runtime.run(lambda: None)  # a run that ends normally passes through


def test_the_process_group_goes_down_after_mains_objects_are_freed_on_success_and_on_error(monkeypatch):
    """Under torchrun, run() tears the process group down once main() has ended and what it made is gone,
    reference cycles too (a DDP model holds the group in one): only then does the group's destructor join
    gloo's threads before the interpreter shuts down. An error or Ctrl-C leaves with its own exit code."""
    class Model:  # a cycle, as a DDP module's hooks make
        def __init__(self):
            self.me = self
    seen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: seen.append(made[-1]() is None))
    made = []

    def main(error=None, *args):
        m = Model()
        made.append(weakref.ref(m))
        if error is not None:
            raise error(*args)  # made here: its traceback holds this frame, and m
    runtime.run(main)
    for error, code in (((SystemExit, "error: bad"), "error: bad"), ((KeyboardInterrupt,), 130),
                        ((SystemExit,), 0)):
        with pytest.raises(SystemExit) as e:
            runtime.run(lambda: main(*error))
        assert e.value.code == code
    assert seen == [True] * 4  # once per run, each after main's model was collected


def test_a_resumed_rank_other_than_0_does_not_replay_rank_0s_random_stream(tmp_path, monkeypatch):
    """Only rank 0 saves its RNG streams: after --resume under torchrun, rank 0 continues its own stream
    exactly, and another rank gets one of its own (the same on every resume), not rank 0's dropout masks."""
    model = M.GPT(M.GPTConfig(block_size=8, vocab_size=N_VOCAB, n_layer=1, n_head=1, n_embd=8))
    optimizer = torch.optim.AdamW(model.parameters())
    torch.manual_seed(5)
    ck = {**runtime.training_state(model, optimizer, torch.amp.GradScaler("cpu", enabled=False)), "step": 3}
    draws = {}
    for rank in ("0", "1", "1"):
        monkeypatch.setenv("RANK", rank)
        assert runtime.restore(ck, model, optimizer) == 3
        draws.setdefault(rank, []).append(torch.rand(4))
    torch.manual_seed(5)
    assert torch.equal(draws["0"][0], torch.rand(4))  # rank 0: exactly the saved stream
    assert not torch.equal(draws["1"][0], draws["0"][0]) and torch.equal(draws["1"][0], draws["1"][1])


def test_resuming_with_options_that_change_the_optimizer_is_one_line():
    """reward.py --lm_feature adds a parameter group: a checkpoint saved without it cannot resume with it."""
    model = M.GPT(M.GPTConfig(block_size=8, vocab_size=N_VOCAB, n_layer=1, n_head=1, n_embd=8))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ck = {**runtime.training_state(model, runtime.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu"),
                                   scaler), "step": 1}
    optimizer = runtime.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    optimizer.add_param_group({"params": [torch.zeros((), requires_grad=True)], "weight_decay": 0.0})
    with pytest.raises(SystemExit, match=r"^error: --resume: the checkpoint's optimizer does not fit these"):
        runtime.restore(ck, model, optimizer, scaler)


def test_a_run_saved_without_fp16_resumes_under_fp16():
    """A checkpoint from an fp32 or bf16 run holds no loss scale (a disabled GradScaler saves {}): resumed
    with --dtype=float16 it continues, its new scaler at the initial scale, instead of a traceback."""
    model = M.GPT(M.GPTConfig(block_size=8, vocab_size=N_VOCAB, n_layer=1, n_head=1, n_embd=8))
    optimizer = runtime.configure_optimizer(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    ck = {**runtime.training_state(model, optimizer, torch.amp.GradScaler("cpu", enabled=False)), "step": 4}
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    assert runtime.restore(ck, model, optimizer, fp16) == 4
    assert fp16.is_enabled() and fp16.get_scale() == torch.amp.GradScaler("cpu").get_scale()


@pytest.mark.parametrize("arg, what", [
    ("--betas=('a', 0.95)", "it must be a tuple of float"),  # a str where the default holds floats
    ("--betas=(0.9, True)", "it must be a tuple of float"),  # bool is an int to Python, not a float here
    ("--names=['x', 3]", "it must be a list of str"),
    ("--lr=1e999", "is out of range: it must be finite"),  # literal_eval reads an overflow as inf
    ("--lr=-1e999", "is out of range: it must be finite"),
    ("--beta=1e999", "is out of range: it must be finite"),  # >= 0 holds for inf, yet no option takes it
    ("--betas=(0.9, 1e999)", "is out of range: it must be finite"),
])
def test_an_option_of_the_wrong_element_type_or_infinite_is_one_line(arg, what):
    g = dict(betas=(0.9, 0.95), names=["a", "b"], lr=1e-3, beta=0.1)
    with pytest.raises(SystemExit) as e:
        runtime.configure(g, [arg])
    msg = str(e.value)
    assert msg.startswith(f"error: {arg.split('=')[0]}") and what in msg and "\n" not in msg, msg


def test_tuples_of_ints_where_floats_are_expected_are_floats():
    g = dict(betas=(0.9, 0.95), sizes=(1, 2), empty=())
    cfg = runtime.configure(g, ["--betas=[1, 0.5]", "--sizes=(3,)", "--empty=('x', 2)"])
    assert cfg == dict(betas=(1.0, 0.5), sizes=(3,), empty=("x", 2))  # an empty default says no type
    assert type(cfg["betas"][0]) is float
    with pytest.raises(SystemExit, match="it must be a tuple of int"):
        runtime.configure(g, ["--sizes=(1, 2.5)"])


def test_a_checkpoint_whose_heads_do_not_divide_its_width_is_one_line(tmp_path):
    """GPT asserts n_embd % n_head == 0 without a message: the line must still come, naming the file."""
    path = tmp_path / "sft.pt"
    ck = save_tiny(path, "sft")
    runtime.save_checkpoint(str(path), {**ck, "model_args": {**ck["model_args"], "n_head": 3}})  # 32 / 3
    with pytest.raises(SystemExit) as e:
        runtime.load_model(str(path), "sft")
    msg = str(e.value)
    assert msg.startswith(f"error: {path}: the weights do not fit") and "AssertionError" in msg, msg


def test_a_resumed_optimizer_keeps_its_moments_but_takes_this_runs_options():
    """load_state_dict would bring back the saved run's lr, betas and weight decay: a run resumed with a lower
    --lr (after a blow-up, say) kept the old one in ppo.py and grpo.py, which never set it again."""
    torch.manual_seed(0)
    m = M.GPT(M.GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    old = runtime.configure_optimizer(m, 0.1, 1e-3, (0.9, 0.95), "cpu")
    m(torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 8)))[1].backward()
    old.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ck = {**runtime.training_state(m, old, scaler), "step": 7}
    new = runtime.configure_optimizer(m, 0.0, 1e-5, (0.8, 0.99), "cpu")
    assert runtime.restore(ck, m, new, scaler) == 7
    hyper = [(g["lr"], g["betas"], g["weight_decay"]) for g in new.param_groups]
    assert hyper == [(1e-5, (0.8, 0.99), 0.0)] * 2
    p = next(m.parameters())
    assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])  # the moments did resume


def test_cuda_rng_states_saved_on_more_gpus_resume_on_fewer(monkeypatch):
    got = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", got.append)
    state = {**runtime.rng_state(), "cuda": ["gpu 0's", "gpu 1's"]}
    runtime.set_rng_state(state)  # was an IndexError inside torch for the missing cuda:1
    assert got == [["gpu 0's"]]


def test_an_apple_gpus_rng_state_is_saved_and_restored(monkeypatch):
    """Dropout on an Apple GPU draws from its own generator: a resumed run there must get its state back."""
    saved, got = torch.tensor([7, 8, 9], dtype=torch.uint8), []
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: saved)
    monkeypatch.setattr(torch.mps, "set_rng_state", got.append)
    state = runtime.rng_state()
    assert state["mps"] is saved
    runtime.set_rng_state(state)
    assert got == [saved]
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # resumed on a CPU: nothing to set
    runtime.set_rng_state(state)
    assert got == [saved] and "mps" not in runtime.rng_state()


def test_each_gpus_rng_state_is_saved_beside_the_cpus_and_one_the_checkpoint_lacks_is_left_alone(monkeypatch):
    """A machine with both kinds of GPU saves both generators next to the CPU's; a checkpoint saved where
    there was no Apple GPU (no "mps" key) resumes on one without touching its generator, as a checkpoint
    without "cuda" leaves a CUDA one alone: no KeyError read as a damaged RNG state."""
    set_cuda, set_mps = [], []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu 0's"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_cuda.append)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: "the apple gpu's")
    monkeypatch.setattr(torch.mps, "set_rng_state", set_mps.append)
    state = runtime.rng_state()
    assert state["cuda"] == ["gpu 0's"] and state["mps"] == "the apple gpu's"
    assert torch.equal(state["torch"], torch.get_rng_state())
    cpu_only = {k: v for k, v in state.items() if k not in ("cuda", "mps")}
    expect = torch.rand(3)
    runtime.set_rng_state(cpu_only)  # the CPU's stream is restored; neither GPU generator is touched
    assert set_cuda == set_mps == [] and torch.equal(torch.rand(3), expect)
    runtime.set_rng_state(state)
    assert set_cuda == [["gpu 0's"]] and set_mps == ["the apple gpu's"]


def test_auto_precision_is_fp16_on_a_gpu_that_only_emulates_bf16(monkeypatch, no_tf32):
    """torch.cuda.is_bf16_supported() is True on a T4 or V100, which emulate bf16 slowly; without its
    emulation they get fp16 with the GradScaler, as the option's comment promises."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert runtime.setup("cuda").dtype == "float16"


@pytest.mark.parametrize("script", ["reward", "pretrain", "sft"])
def test_adam_betas_are_checked_by_every_stage_that_has_them(refusal, script, tmp_path):
    """reward.py took --beta1=1.0, sampled and ranked its comparisons, then stopped in AdamW's traceback."""
    for bad in ("--beta1=1.0", "--beta2=-0.5"):
        msg = refusal(script, f"--out_dir={tmp_path}", bad)
        assert msg == f"error: {bad} is out of range: it must be in [0, 1)", msg
    assert not os.listdir(tmp_path)


def test_gpt2_weights_with_no_head_count_to_guess_are_one_line(tmp_path):
    sd = M.GPT(M.GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)).state_dict()
    args = dict(block_size=8, vocab_size=16, n_layer=1, n_head=0, n_embd=8)  # n_embd // 64 guessed 0 heads
    with pytest.raises(SystemExit, match="^error: w: the weights do not fit its model_args"):
        runtime.model_from_checkpoint({"model": sd, "model_args": args}, "w")


def test_weights_holding_a_nan_are_one_line_before_any_use(tmp_path):
    """A NaN in a checkpoint (made elsewhere: ours never holds one) answered every message with nothing, and
    in grpo.py stopped at the first loss with advice to lower --lr."""
    args = dict(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)
    sd = M.GPT(M.GPTConfig(**args)).state_dict()
    runtime.model_from_checkpoint({"model": sd, "model_args": args}, "w")  # finite: it loads
    sd["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    with pytest.raises(SystemExit, match="^error: w holds NaN or inf weights: not a usable model$"):
        runtime.model_from_checkpoint({"model": sd, "model_args": args}, "w")


def test_a_resumed_log_keeps_its_rows_up_to_the_checkpoint_past_a_damaged_byte(tmp_path):
    path = tmp_path / "ppo.jsonl"
    path.write_bytes(b'{"iter": 1}\n\xff\xfe\n{"iter": 2}\n{"iter": 3}\n{"iter": 4')  # a kill cut the last
    runtime.start_log(str(path), 2)
    assert path.read_text() == '{"iter": 1}\n{"iter": 2}\n'
    runtime.start_log(str(path))  # a fresh run: a fresh log
    assert not path.exists()


def test_a_resumed_log_whose_rewrite_fails_keeps_every_old_row(tmp_path, monkeypatch):
    """The kept rows replace the log through a temporary file: a full disk while writing them is one line,
    and the old log (every row of the killed run) is still there to resume from, with no temporary file."""
    path = tmp_path / "ppo.jsonl"
    old = b'{"iter": 1}\n{"iter": 2}\n{"iter": 3}\n'
    path.write_bytes(old)

    def full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(file, mode, *args, **kwargs)
    monkeypatch.setattr(runtime, "open", full_disk, raising=False)
    with pytest.raises(SystemExit, match=r"^error: could not write .*ppo\.jsonl \(No space left on device"):
        runtime.start_log(str(path), 2)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["ppo.jsonl"]


@pytest.mark.parametrize("script, below", [("pretrain", ""), ("grpo", ""), ("evaluate", ""), ("sft", "/a/b")])
def test_an_out_dir_that_is_a_file_is_one_line_before_anything_runs(tmp_path, refusal, script, below):
    """grpo.py built SFT (pretraining it first) into a path it could not write, and stopped with a traceback
    at its first log line, minutes later; a folder below a file failed as late."""
    f = tmp_path / "out"
    f.write_text("notes")
    msg = refusal(script, f"--out_dir={f}{below}")
    assert msg == f"error: --out_dir='{f}{below}' is out of range: it must be a directory this user can write"
    assert f.read_text() == "notes" and os.listdir(tmp_path) == ["out"]


def test_writable_dir_walks_up_to_what_exists(tmp_path):
    """A new folder is fine where its nearest existing ancestor is a writable folder; a file, or a link to
    nothing (makedirs cannot replace it: it failed after a training step), is not."""
    (tmp_path / "f").write_text("x")
    os.symlink(tmp_path / "missing", tmp_path / "dangling")
    assert runtime.writable_dir(str(tmp_path / "new" / "deeper")) and runtime.writable_dir(str(tmp_path))
    assert not runtime.writable_dir(str(tmp_path / "f" / "sub"))
    assert not runtime.writable_dir(str(tmp_path / "dangling"))


def test_setup_seeds_python_numpy_and_torch_with_seed_plus_rank(monkeypatch):
    """Under torchrun every rank must draw its own data and samples: setup seeds python's, numpy's and
    torch's global generators with seed + RANK. Rank 1 of 2 (the process group stubbed), seed 5: 6."""
    import numpy as np
    for name, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    rt = runtime.setup("cpu", "float32", 5)
    assert (rt.rank, rt.world_size, rt.ddp, rt.master) == (1, 2, True, False)
    assert torch.initial_seed() == 6
    assert random.random() == random.Random(6).random()
    assert np.random.random() == np.random.RandomState(6).random_sample()


def test_append_jsonl_writes_a_bare_file_name_here_and_tensors_as_floats(tmp_path, monkeypatch):
    """A log path with no folder is a file in the working directory; a tensor or numpy scalar is a number."""
    import numpy as np
    monkeypatch.chdir(tmp_path)
    runtime.append_jsonl("log.jsonl", {"iter": 1, "loss": torch.tensor(0.5), "acc": np.float32(0.25)})
    runtime.append_jsonl("log.jsonl", {"iter": 2})
    assert [json.loads(line) for line in open("log.jsonl")] == [{"iter": 1, "loss": 0.5, "acc": 0.25},
                                                                 {"iter": 2}]


def test_a_stopwatch_on_another_rank_returns_its_line_but_prints_nothing(capsys):
    """Under torchrun only the first process prints the closing line; the others still return it."""
    ticks = iter([0.0, 1.0, 3.0])
    watch = runtime.Stopwatch(master=False, clock=lambda: next(ticks))
    watch.lap("sampling")
    assert watch.report("ppo") == "ppo time 3.0 s: sampling 1.0 s (33%), other 2.0 s (67%)"
    assert capsys.readouterr().out == ""
