"""
What every stage needs around the network, nanoGPT style: device, precision (autocast, GradScaler) and DDP;
the one optimizer step and learning-rate schedule; checkpoints (atomic, weights_only, never non-finite) and
RNG state; a stopwatch; `--name=value` config; JSONL logs; building a missing stage; the non-finite guard."""
import ast
import gc
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import torch

from data.tokenizer import get_tokenizer
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# Device, precision, DDP, optimizer

def setup(device="auto", dtype="auto", seed=1337):
    """Read torchrun's environment, pick device and precision, seed. Returns a namespace: device, device_type,
    dtype, ptdtype, ctx (autocast or nullcontext), scaler, ddp, rank, local_rank, world_size, master."""
    ddp, rank = int(os.environ.get("RANK", -1)) != -1, int(os.environ.get("RANK", 0))
    local_rank, world_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = ("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available()
                  else "cpu")
    device_type = device.split(":")[0]
    device = f"cuda:{local_rank}" if ddp and device_type == "cuda" else device  # one process per GPU
    if (device_type == "cuda" and int(device[5:] or 0) >= torch.cuda.device_count()
            or device_type == "mps" and not torch.backends.mps.is_available()):  # else torch fails much later
        raise SystemExit(f"error: --device={device} is not available on this machine; try --device=auto"
                         + " and at most one process per GPU" * ddp)
    if device_type == "cuda":  # the current GPU: synchronize() and the bf16 check below read that one
        torch.cuda.set_device(int(device[5:] or 0))  # ("cuda" alone is not an index to set_device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 (Ampere+)
    if ddp:
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    if dtype == "auto":
        dtype = ("float32" if device_type != "cuda"  # bf16 only where the card has bf16 units (Ampere on)
                 else "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # autocast runs matmuls in low precision and keeps reductions in fp32; fp16 also needs loss scaling
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if device_type == "cpu" and dtype != "float32" and rank == 0:  # no bf16/fp16 units: emulated, slow
        low, full = matmul_flops(ptdtype), matmul_flops(torch.float32)
        if 2 * low < full:  # emulation is several times slower; units tie this small probe or win
            print(f"warning: this CPU has no {dtype} units ({dtype} matmuls {low / 1e9:.1f} GFLOP/s, float32 "
                  f"{full / 1e9:.1f}): --dtype={dtype} is slower here than --dtype=float32", file=sys.stderr)
    for seeded in (random.seed, np.random.seed, torch.manual_seed):
        seeded(seed + rank)  # each rank draws different data and samples
    return SimpleNamespace(device=device, device_type=device_type, dtype=dtype, ptdtype=ptdtype, ctx=ctx,
                           scaler=scaler, ddp=ddp, rank=rank, local_rank=local_rank, world_size=world_size,
                           master=(rank == 0))

def matmul_flops(ptdtype, device="cpu", n=256, iters=3, min_seconds=0.0):
    """FLOP/s of an n x n matmul in ptdtype on device: what that precision really runs at here. At least iters
    products, and more until min_seconds have passed: a GPU does one in microseconds, so a few would time the
    launches and the clock's ramp, not the arithmetic."""
    a = torch.randn(n, n, device=device).to(ptdtype)
    (a @ a).sum().item()  # untimed: the first product sets up the kernels (.item() waits for a GPU to finish)
    t0, done = time.perf_counter(), 0
    while done < iters or min_seconds and time.perf_counter() - t0 < min_seconds:
        b = a @ a
        done += 1
    b.sum().item()
    return 2 * n ** 3 * done / (time.perf_counter() - t0)  # a multiply-add is 2 FLOPs

def cleanup():
    """Tear torchrun's process group down once the stage's objects are gone (run() calls it after main()).
    gloo's worker threads let go of each finished collective's tensors, which takes the GIL: a process that
    reached interpreter shutdown before they did aborted ("terminate called without an active exception").
    The DDP model holds the group in a reference cycle, so collect it first; the group's destructor then
    joins those threads while the interpreter still runs."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        torch.distributed.destroy_process_group()

def wrap(model, rt, compile=False):
    """The model a training loop calls: torch.compile'd if asked, then DDP under torchrun (gradients
    all-reduced in backward). Keep the unwrapped one for saving, evaluation and generation."""
    model = torch.compile(model) if compile else model
    if rt.ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
    return model

def configure_optimizer(model, weight_decay, lr, betas, device_type):
    """AdamW; decay only matrices (weights, embeddings), never biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

def optimizer_step(model, optimizer, scaler, grad_clip):
    """The one update every stage makes after backward(): unscale fp16 gradients so the clip sees true norms,
    clip the global gradient norm (0 = off), step, update the loss scale, zero the gradients. Returns the true
    norm before clipping. A non-finite norm skips the step: under fp16 a usual overflow (the scaler lowers its
    scale), returned as 0 for check_finite to let pass; without a scaler, check_finite stops on it."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    if scaler.is_enabled() or torch.isfinite(norm):
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return norm.nan_to_num(0.0, 0.0, 0.0) if scaler.is_enabled() else norm  # 0 if skipped, with no GPU sync

def get_lr(it, warmup, max_iters, lr, min_lr):
    """Linear warmup, then cosine decay from lr to min_lr at max_iters (SGDR's cosine without restarts,
    Loshchilov & Hutter 2016, https://arxiv.org/abs/1608.03983)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = min(1.0, (it - warmup) / max(1, max_iters - warmup))  # from max_iters on: min_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

def warn_short_schedule(steps, warmup, master):
    """A run whose step count comes from its data (reward.py, dpo.py on a small file) may end inside its
    warmup, where get_lr never reaches lr: a small file would train weakly, unseen. Says so (if master)."""
    if master and steps <= warmup:
        print(f"warning: {steps} step{'s' * (steps != 1)}, not more than --warmup_iters={warmup}: the lr "
              f"rises to {steps / (warmup + 1):.0%} of --lr and never decays (raise --epochs or lower "
              "--warmup_iters)", file=sys.stderr)

# -----------------------------------------------------------------------------
# Checkpoints and RNG state

def clean_state_dict(sd):
    """Drop the prefixes torch.compile ('_orig_mod.') and DDP ('module.') put on every key."""
    return {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in sd.items()}

def write_whole(path, write):
    """write(f) fills a temp file beside path, which then replaces path in one rename: a kill or a full disk
    mid-write leaves the old file or the new one, never half of one, and no temp file."""
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:  # (Ctrl-C too; a directory of that name, left by hand, is in the way: the error says so)
        if os.path.isfile(tmp):
            os.remove(tmp)

def save_checkpoint(path, ckpt):
    """Written whole (write_whole): a kill mid-write leaves the old file intact. Refuses weights with a NaN or
    inf (nothing downstream may ever read a broken model); a failed write (disk full, read-only directory)
    removes its temp file, keeps the old checkpoint and stops with one line."""
    if isinstance(ckpt.get("model"), dict):
        ckpt = {**ckpt, "model": clean_state_dict(ckpt["model"])}
        bad = [k for k, v in ckpt["model"].items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
        if bad:
            raise SystemExit(f"error: refusing to write {path}: {len(bad)} tensors are not finite "
                             f"({bad[0]}, ...); the last good checkpoint is kept")
    try:
        write_whole(path, lambda f: torch.save(ckpt, f))
    except BaseException as e:
        err = e if isinstance(e, OSError) else e.__context__  # torch.save raises RuntimeError on an OSError
        if not isinstance(err, OSError):
            raise
        raise SystemExit(f"error: could not write {path} ({err.strerror or err}); the old file is unchanged")

def load_checkpoint(path, kinds=None, map_location="cpu", need=()):
    """torch.load(weights_only=True); one line for a missing, unreadable, wrong-kind or need-lacking file."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: {path} is empty: not a checkpoint (a write that never finished?)")
    try:  # weights_only: a checkpoint is tensors and plain values; a pickle that would run code is refused
        with warnings.catch_warnings():  # the refusal is our one line, not torch's advice to unpickle anyway
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:200]  # not torch's "re-run unsafely"
        raise SystemExit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(ckpt, dict):
        raise SystemExit(f"error: {path} is not a checkpoint of this project (a {type(ckpt).__name__})")
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    if kinds is not None and ckpt.get("kind") not in kinds:
        raise SystemExit(f"error: {path} is a {ckpt.get('kind')!r} checkpoint; "
                         f"expected one of {', '.join(kinds)}")
    missing = [k for k in ("model", "model_args") if not isinstance(ckpt.get(k), dict)]
    missing += [k for k in need if k not in ckpt]  # what --resume reads: an older script may lack it
    if missing:
        raise SystemExit(f"error: {path} has no {', '.join(missing)}: not a complete checkpoint"
                         + "; start afresh without --resume" * bool(need))
    looks = {"step": lambda v: type(v) is int and v >= 0, "rng": lambda v: isinstance(v, dict) and {
        "python", "numpy", "torch"} <= v.keys(), "optimizer": lambda v: isinstance(v, dict) and {
        "state", "param_groups"} <= v.keys(), "scaler": lambda v: isinstance(v, dict),
        "rank_rng": lambda v: isinstance(v, list) and all(isinstance(s, dict) for s in v),
        "kl_coef": lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0}
    damaged = [k for k in need if k in looks and not looks[k](ckpt[k])]  # restore() would fail on them
    if damaged:
        raise SystemExit(f"error: {path}: damaged {', '.join(damaged)}; start afresh without --resume")
    return ckpt

def load_weights(model, sd):
    """load_state_dict; the scalar head may be new (base -> reward) or dropped, lm_head absent (it is wte)."""
    sd = clean_state_dict(sd)
    sd = {k: v for k, v in sd.items() if model.scalar_head is not None or not k.startswith("scalar_head.")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad = [k for k in missing if not k.startswith(("scalar_head.", "lm_head."))] + list(unexpected)
    if bad:
        raise ValueError(f"state dict does not fit the model: {bad[:5]}")
    return model

def model_from_checkpoint(ckpt, path="checkpoint", **overrides):
    """GPT built from ckpt['model_args'] (updated with overrides, e.g. dropout=0.0, scalar_head=True); a
    checkpoint whose arguments or weights do not fit, or whose weights hold a NaN or inf, is one line."""
    try:
        model = load_weights(GPT(GPTConfig(**{**ckpt["model_args"], **overrides})), ckpt["model"])
    except (TypeError, ValueError, RuntimeError, AssertionError, ZeroDivisionError) as e:  # 0 heads
        raise SystemExit(f"error: {path}: the weights do not fit its model_args "  # an assert may say nothing
                         f"({(str(e).splitlines() or [type(e).__name__])[0][:200]})")
    if not all(torch.isfinite(v).all() for v in model.state_dict().values()):  # it would answer nothing
        raise SystemExit(f"error: {path} holds NaN or inf weights: not a usable model")
    return model

def load_model(path, kinds, need=(), **overrides):
    """(model, tokenizer, checkpoint) from a stage checkpoint; overrides change GPTConfig (dropout=0.0)."""
    ckpt = load_checkpoint(path, kinds, need=need)
    enc = get_tokenizer(ckpt.get("tokenizer", "world"))
    check_vocab(path, ckpt, enc)
    return model_from_checkpoint(ckpt, path, **overrides), enc, ckpt

def check_vocab(path, ckpt, enc):
    """One line if the checkpoint's embedding has fewer rows than enc has tokens (an IndexError later)."""
    if not type(v := ckpt["model_args"].get("vocab_size")) is int or enc.n_vocab > v:
        raise SystemExit(f"error: {path}: its vocabulary ({v}) is smaller than its tokenizer's "
                         f"({enc.n_vocab} tokens)")

def same_network(path, ckpt, ref, what="the SFT model", hint=""):
    """One line if ckpt (read from path) is not the network of the checkpoint ref (`what` names ref): a stage
    that continues from, or compares with, another checkpoint needs the same shape, vocabulary, tokenizer."""
    a, b = ({**c["model_args"], "tokenizer": c.get("tokenizer", "world")} for c in (ckpt, ref))
    keys = ("vocab_size", "n_layer", "n_head", "n_embd", "block_size", "tokenizer")
    diff = [f"{k} {a.get(k)} vs {b.get(k)}" for k in keys if a.get(k) != b.get(k)]
    if diff:
        raise SystemExit(f"error: {path} is another network than {what} ({', '.join(diff)}){hint}")

def fingerprint(state_dict):
    """A short hash of a model's weights, stored in the reward model and the tuned policies: which SFT model
    each was trained from."""
    h = hashlib.sha256()
    for k, v in sorted(clean_state_dict(state_dict).items()):
        h.update(k.encode() + v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]

def out_dir_args(out_dir):  # --out_dir, named unless it is the default: for a stage run here, or a message
    return [] if os.path.normpath(out_dir or ".") == "out" else [f"--out_dir={out_dir or '.'}"]

def command(script, out_dir, *args):
    """The command a message suggests, runnable as printed."""
    return "`" + " ".join(["python", script, *args, *out_dir_args(out_dir)]) + "`"

def trained_from(path, ck, sft_ck, remedy=None):
    """One line if the checkpoint ck was trained from other weights than sft_ck's, e.g. sft.py was run again
    since: a reward model's scores, normalised on the old model's answers, would judge the new one's; a policy
    resumed against the new reference would continue a KL measured from a model it never started from. (A
    checkpoint from before the fingerprint was kept cannot say, and passes.)"""
    same_network(path, ck, sft_ck)
    if ck.get("sft_fingerprint") not in (None, sft_ck.get("fingerprint") or fingerprint(sft_ck["model"])):
        raise SystemExit(f"error: {path} was trained from another SFT model (the same network, other "
                         f"weights: was sft.py run again?); "
                         f"{remedy or 'train it anew with ' + command('reward.py', os.path.dirname(path))}")

def load_reward_model(path, device, sft_ck=None):
    """(reward model, checkpoint), frozen, in eval mode. One line for a file with no reward head, one saved
    mid-training (unnormalised), or one trained from another network or weights than sft_ck's."""
    ck = load_checkpoint(path, "reward")
    if not any("scalar_head." in k for k in ck["model"]):  # load_weights lets a base model's head be new
        raise SystemExit(f"error: {path} has no reward head (scalar_head): not a reward model")
    if sft_ck is not None:
        trained_from(path, ck, sft_ck)
    if ck.get("normalised") is False:
        raise SystemExit(f"error: {path} was saved before training finished (not normalised); finish it with "
                         + command("reward.py", os.path.dirname(path), "--resume=True"))
    numbers = [ck.get(k, 0.0) for k in ("gain", "bias", "lm_weight")]  # every score: gain * r + bias (+ ...)
    if not all(type(x) in (int, float) and math.isfinite(x) for x in numbers) or numbers[0] <= 0:
        raise SystemExit(f"error: {path}: its gain, bias and lm_weight ({', '.join(map(repr, numbers))}) "
                         "are not finite numbers with gain > 0: not a usable reward model")
    rm = model_from_checkpoint(ck, path, dropout=0.0, scalar_head=True)
    return rm.to(device).eval().requires_grad_(False), ck

def rng_state():
    """Python, numpy and torch RNG states (CPU, and each GPU's: dropout draws there) as plain tuples, lists
    and tensors (weights_only-loadable)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    d = {"python": random.getstate(), "torch": torch.get_rng_state(),
         "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    d |= {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return d | ({"mps": torch.mps.get_rng_state()} if torch.backends.mps.is_available() else {})

def seeded_generator(*key):  # seeded by a hash of the whole key: no two (seed, step, micro, rank) share it
    return torch.Generator().manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))

def set_rng_state(d):
    set_sampler_state(random, d["python"])
    np.random.set_state(("MT19937", d["numpy"][0].numpy().astype(np.uint32), *d["numpy"][1:]))  # pos, gauss
    torch.set_rng_state(d["torch"])
    if "cuda" in d and torch.cuda.is_available():  # saved on a machine with more GPUs: the first ones
        torch.cuda.set_rng_state_all(d["cuda"][:torch.cuda.device_count()])
    if "mps" in d and torch.backends.mps.is_available():
        torch.mps.set_rng_state(d["mps"])

DAMAGED_STATE = (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError)  # RNG states
RESUME = ("step", "optimizer", "scaler", "rng")  # what restore() reads: load_checkpoint(..., need=RESUME)

def training_state(model, optimizer, scaler, log=None):
    """The part of a checkpoint that --resume needs besides config and step (restore() reads it back), and the
    stage's log as it stands: its size and SHA-256, which start_log checks a resumed run's log against."""
    mark = None
    if log and os.path.isfile(log):
        with open(log, "rb") as f:
            data = f.read()
        mark = [len(data), hashlib.sha256(data).hexdigest()]
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state(), "log": mark}

def restore(ckpt, model, optimizer, scaler=None):
    """--resume: weights, optimizer moments, loss scale and every RNG stream from a checkpoint; returns its
    step, so the loop continues exactly where the saved run was (under torchrun: ppo.py and grpo.py only)."""
    load_weights(model, ckpt["model"])
    options = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]  # this run's
    try:  # options that change the optimizer's parameter groups (reward.py --lm_feature) cannot resume it
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --resume: the checkpoint's optimizer does not fit these options ({e})")
    for group, opts in zip(optimizer.param_groups, options):  # Adam's moments resume; lr, betas, weight
        group.update(opts)  # decay and the rest are what this run was asked for, not what the saved one was
    try:  # a saved {} is a run without fp16: a new fp16 scaler starts afresh
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
    except DAMAGED_STATE as e:
        raise SystemExit(f"error: --resume: the checkpoint's loss scale is damaged ({type(e).__name__}); "
                         "start afresh without --resume") from None
    try:
        set_rng_state(ckpt["rng"])
    except DAMAGED_STATE as e:
        raise SystemExit(f"error: --resume: the checkpoint's RNG state is damaged ({type(e).__name__}); "
                         "start afresh without --resume") from None
    if int(os.environ.get("RANK", 0)):  # only rank 0's were saved: shift them, or all drop the same units
        torch.manual_seed(int(torch.randint(2 ** 62, ())) + int(os.environ["RANK"]))
    return ckpt["step"]

def load_rl_inputs(out_dir, use_rm, rt):
    """An RL stage's frozen inputs, each built by its own stage first when missing (rank 0 builds, the others
    wait): (SFT reference, tokenizer, SFT checkpoint, reward model if use_rm else None, its checkpoint)."""
    sft_path, rm_path = os.path.join(out_dir, "sft.pt"), os.path.join(out_dir, "reward.pt")
    for path, script in [(sft_path, "sft.py")] + [(rm_path, "reward.py")] * use_rm:
        ensure_checkpoint(path, script, out_dir)
    ref, enc, sft_ck = load_model(sft_path, "sft", dropout=0.0)
    sft_ck["fingerprint"] = fingerprint(sft_ck["model"])  # once: checked against, and saved with the policy
    ref.to(rt.device).eval().requires_grad_(False)
    rm, rm_ck = load_reward_model(rm_path, rt.device, sft_ck) if use_rm else (None, None)
    return ref, enc, sft_ck, rm, rm_ck

def set_sampler_state(rng, state):  # random.getstate() loads under weights_only; older files hold lists
    rng.setstate((state[0], tuple(state[1]), state[2]))

def rank_rng_states(rng, rt):
    """Each rank's prompt sampler and reply generator, [rank 0's, ...]; rng_state() holds rank 0's only. With
    them a resumed torchrun run draws what an uninterrupted one would. A collective: every rank calls it."""
    mine = {"prompts": rng.getstate(), "torch": torch.get_rng_state(),
            **({"cuda": torch.cuda.get_rng_state(rt.device)} if rt.device_type == "cuda" else {})}
    states = [mine] * rt.world_size  # one process: its own; under torchrun every slot is filled by the gather
    if rt.ddp:
        torch.distributed.all_gather_object(states, mine)
    return states

def set_rank_rng_states(rng, states, rt):
    if rt.rank < len(states):  # resumed on more processes than it was saved from: the new ranks start fresh
        try:
            s = states[rt.rank]
            set_sampler_state(rng, s["prompts"])
            torch.set_rng_state(s["torch"])
            if "cuda" in s and rt.device_type == "cuda":
                torch.cuda.set_rng_state(s["cuda"], rt.device)
        except DAMAGED_STATE as e:
            raise SystemExit(f"error: --resume: the checkpoint's rank_rng is damaged ({type(e).__name__}); "
                             "start afresh without --resume") from None

def read_log(path):
    """A stage's JSONL log as a list of dicts ([] if there is none): a line a kill cut short, a damaged byte
    or a line that is not an object costs that line, not the run (or the report that draws the log)."""
    rows = []
    for line in open(path, errors="replace") if os.path.isfile(path) else []:
        try:
            rows.append(json.loads(line))
        except (ValueError, RecursionError):
            pass
    return [r for r in rows if isinstance(r, dict)]

def start_log(path, resumed_step=None, checkpoint=None):
    """Called once a run is known to start (so a run that fails its checks loses no log): a fresh run starts
    a fresh log; a resumed one drops the rows a killed run logged after its last checkpoint (and a line cut by
    the kill), so its rows follow on as an uninterrupted run's would. A log that does not begin as the
    resumed checkpoint's record of it says (training_state's "log") is a later run's (a fresh run killed
    before its first checkpoint started it): resuming would splice two runs' rows, so it is one line, as is a
    failed write."""
    keep = [] if resumed_step is None else [
        r for r in read_log(path) if type(r.get("iter")) in (int, float) and r["iter"] <= resumed_step]
    mark, text = (checkpoint or {}).get("log"), "".join(json.dumps(r) + "\n" for r in keep).encode()
    try:
        if resumed_step is not None and isinstance(mark, list) and len(mark) == 2 and os.path.isfile(path):
            with open(path, "rb") as f:
                text = f.read(mark[0]) if type(mark[0]) is int and mark[0] >= 0 else b""  # as it was saved
            if hashlib.sha256(text).hexdigest() != mark[1]:
                raise SystemExit(f"error: --resume: {path} is the log of a later run than the checkpoint "
                                 "(one stopped before its first checkpoint); start afresh without --resume")
        if text:  # the kept rows replace the log whole (a kill leaves the old log or the new, never neither)
            write_whole(path, lambda f: f.write(text))
        elif os.path.lexists(path):
            os.remove(path)
    except OSError as e:  # a directory in the way, a read-only directory
        raise SystemExit(f"error: could not write {path} ({e.strerror or e})") from None

def ensure_checkpoint(path, script, out_dir):
    """A stage's input is missing: say which command makes it, then run that stage with its defaults, in this
    process's directory (so out_dir is the same folder to both): `python ppo.py` works on a fresh clone.
    Under torchrun every rank calls it: rank 0 builds, the others wait for it at a barrier of a group made for
    the wait, with a day's timeout: the default group's (gloo 30 minutes, NCCL 10) could end a long build."""
    failed = None
    if not os.path.isfile(path) and int(os.environ.get("RANK", 0)) == 0:
        flag = out_dir_args(out_dir)
        print(f"{path} not found: running {command(script, out_dir)} to make it")
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script)] + flag
        if subprocess.run(cmd, env=env).returncode != 0 or not os.path.isfile(path):
            failed = f"error: {command(script, out_dir)} did not produce {path}"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # rank 0 comes too when the build failed (else the others' wait breaks). gloo's group works beside any
        # device's; destroyed at once, its threads are joined here rather than at the interpreter's exit
        wait = torch.distributed.new_group(backend="gloo", timeout=timedelta(days=1))
        torch.distributed.barrier(group=wait)
        torch.distributed.destroy_process_group(wait)
    if failed or not os.path.isfile(path):  # (the other ranks exit quietly: rank 0 has said why)
        raise SystemExit(failed or 1)

# -----------------------------------------------------------------------------
# Where a stage's time goes

class Stopwatch:
    """Wall time per phase of a stage: lap(phase) adds the seconds since the previous lap to that phase
    (sample; lap("sampling"); train; lap("training")). On a GPU a lap first waits for the queued kernels."""

    def __init__(self, device_type="cpu", master=True, clock=time.perf_counter):
        self.clock, self.master, self.sync = clock, master, getattr(torch, device_type).synchronize
        self.start = self.last = clock()
        self.seconds = {}  # phase -> seconds, in the order the phases first appear

    def lap(self, phase):
        self.sync()  # torch.cuda's or torch.mps's; torch.cpu's returns at once
        now = self.clock()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now

    def report(self, stage, last="other"):
        """The stage's closing line, printed by the first process and returned: the seconds since the start,
        by phase (the time since the last lap counts as last)."""
        self.lap(last)
        total = max(self.last - self.start, 1e-9)
        parts = ", ".join(f"{p} {s:.1f} s ({s / total:.0%})" for p, s in self.seconds.items())
        line = f"{stage} time {total:.1f} s: {parts}"
        if self.master:
            print("\n" + line)
        return line

# -----------------------------------------------------------------------------
# Logs and --name=value overrides (nanoGPT's configurator, with type checks)

def run(main):
    """A script's entry point: main(), with Ctrl-C one line rather than a traceback (a checkpoint is only ever
    replaced whole, by save_checkpoint, so a training stage continues from its last one with --resume=True);
    then, main's objects freed, the process group's teardown (cleanup), on success and on error alike."""
    status = None
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: a training stage continues from its last checkpoint with --resume=True",
              file=sys.stderr)
        status = 130  # 128 + SIGINT, as a shell reports it
    except SystemExit as e:  # an error's one line (or --help): said once the group is down
        status = 0 if e.code is None else e.code
    # outside the except blocks, where an exception's traceback still holds main's frame, and with it the
    # DDP model that keeps the process group alive
    cleanup()
    if status is not None:
        raise SystemExit(status)

def check_finite(stage, step, hint, **values):
    """The non-finite guard: the first NaN or inf loss, gradient norm or reward stops the stage in one line
    (stage, step, quantity, what to try); checkpoints hold only finite weights, so the last good one stays."""
    for name, v in values.items():
        bad = ~torch.isfinite(v.detach()) if torch.is_tensor(v) else torch.tensor(not math.isfinite(float(v)))
        if bad.any():  # a tensor counts if any element is NaN or inf
            shown = v.detach()[bad].flatten()[0].item() if torch.is_tensor(v) else v
            raise SystemExit(f"error: {stage} step {step}: {name} is {shown} (not finite); stopped, "
                             f"the last good checkpoint is kept; try {hint}")

def append_jsonl(path, obj):
    """One metrics object per line; tensors and numpy scalars become floats. A failed write is one line."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(obj, default=float) + "\n")
    except OSError as e:
        raise SystemExit(f"error: could not write {path} ({e.strerror or e})") from None

def writable_dir(path):
    """Whether path is, or can be made as, a directory this process may write in (its nearest ancestor)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):  # a dangling link counts as there: makedirs could not replace it
        path = os.path.dirname(path)
    return os.path.isdir(path) and os.access(path, os.W_OK)

RANGES = {  # shared options' valid ranges (a stage adds its own via configure), checked before anything else
    **dict.fromkeys(("batch_size", "grad_accum", "eval_interval", "eval_iters", "max_new_tokens",
                     "minibatch_size", "ppo_epochs", "eval_samples", "samples", "gen_batch", "K", "online_k",
                     "online_prompts", "online_pairs", "sample_interval"), (lambda v: v >= 1, ">= 1")),
    **dict.fromkeys(("max_iters", "warmup_iters", "stop_at", "n_eval", "n_prompts", "n_train", "bon",
                     "online_rounds", "beta", "min_lr", "grad_clip", "weight_decay", "target_kl", "rpo_alpha",
                     "vf_coef", "no_end_penalty"), (lambda v: v >= 0, ">= 0")),
    **dict.fromkeys(("lr", "online_lr", "vf_lr", "epochs", "labeler_tau", "kl_horizon"),
                    (lambda v: v > 0, "> 0")),
    "temperature": (lambda v: v >= 1e-3, ">= 0.001 (logits / temperature overflows as it nears 0)"),
    **dict.fromkeys(("dropout", "val_fraction", "eval_fraction", "beta1", "beta2"),
                    (lambda v: 0 <= v < 1, "in [0, 1)")),
    **dict.fromkeys(("cliprange", "cliprange_value"), (lambda v: 0 < v < 1, "in (0, 1)")),
    "label_smoothing": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"), "contexts": (lambda v: v >= 2, ">= 2"),
    "gamma": (lambda v: 0 < v <= 1, "in (0, 1]"), "lam": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (lambda v: 0 <= v < 2 ** 31, "in [0, 2**31)"),  # numpy takes seed + rank, below 2**32
    "out_dir": (writable_dir, "a directory this user can write"),  # checked before minutes of training
    "dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16, float16"),
    "device": (lambda v: v in ("auto", "cpu", "mps", "cuda") or v.startswith("cuda:") and v[5:].isdigit(),
               "one of auto, cpu, cuda, cuda:N, mps"),
}

def configure(g, argv=None, ranges=None):
    """Apply --name=value overrides to the config globals g, then check every option's range (RANGES, then the
    stage's own {name: (ok(value), rule)}); returns {name: value}. A bad name, type or value is one line."""
    # a file name of bytes the locale cannot decode holds lone surrogates: printed escaped, not a crash
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")
    keys = [k for k, v in g.items()
            if not k.startswith("_") and (v is None or type(v) in (int, float, bool, str, tuple, list))]
    for arg in sys.argv[1:] if argv is None else argv:
        if arg in ("--help", "-h"):  # what each option means is in the config block at the top of the script
            print("options (--name=value), with their defaults:", *(f"  --{k}={g[k]!r}" for k in keys),
                  sep="\n")
            raise SystemExit(0)
        if arg.startswith("--") and arg[2:] in keys and isinstance(g[arg[2:]], bool):
            arg += "=True"  # a bare --flag switches a bool option on: --sweep means --sweep=True
        if not arg.startswith("--") or "=" not in arg:  # the line lists every option
            raise SystemExit(f"error: {arg!r} is not --name=value; valid options: {', '.join(keys)}")
        name, raw = arg[2:].split("=", 1)
        if name not in keys:
            raise SystemExit(f"error: unknown option --{name}; valid options: {', '.join(keys)}")
        old = g[name]
        try:
            new = ast.literal_eval(raw)
        except (ValueError, SyntaxError):  # a bare word: a str option's value, a bool's true/false, or wrong
            new = {"true": True, "false": False}.get(raw.lower(), raw) if isinstance(old, bool) else raw
        seq = isinstance(old, (tuple, list)) and isinstance(new, (tuple, list))
        t = type(old[0]) if seq and old and all(type(v) is type(old[0]) for v in old) else None
        if isinstance(old, str) and not isinstance(new, str):
            new = raw  # --out_dir=123 means the directory "123"
        elif seq:  # a tuple stays a tuple, a list a list; ints where the default holds floats are fine
            new = type(old)(float(v) if t is float and type(v) is int else v for v in new)
        elif isinstance(old, float) and type(new) is int:
            new = float(new)
        if old is not None and type(new) is not type(old):
            raise SystemExit(f"error: --{name} expects {type(old).__name__}, "
                             f"got {type(new).__name__} {raw!r}")
        for v in new if seq else [new]:  # a tuple's elements: its default's type; numbers: finite (not 1e999)
            rule = f"a {type(old).__name__} of {t.__name__}" if t and type(v) is not t else "finite"
            if rule != "finite" or type(v) is float and not math.isfinite(v):
                raise SystemExit(f"error: --{name}={new!r} is out of range: it must be {rule}")
        g[name] = new
    ranges = ranges or {}  # the stage's rules last, in its order: one that depends on another comes after it
    for name, (ok, rule) in [(k, r) for k, r in RANGES.items() if k not in ranges] + list(ranges.items()):
        if name in keys and g[name] is not None and not ok(g[name]):
            raise SystemExit(f"error: --{name}={g[name]!r} is out of range: it must be {rule}")
    if g.get("min_lr", 0) > g.get("lr", math.inf):  # a floor above the peak: the schedule would climb to it
        raise SystemExit(f"error: --min_lr={g['min_lr']!r} is out of range: it must be <= --lr={g['lr']!r}")
    return {k: g[k] for k in keys}
