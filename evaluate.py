"""
Evaluate: every stage side by side on held-out prompts, judged by the hidden human -> out/report.md

For each checkpoint present (base, sft, best-of-N from SFT with the reward model, ppo, grpo, rloo, dpo) it
samples answers to the held-out prompts and reports: mean gold utility as a fraction of ideal (the world's
ideal answers score 1.0), gold win rate against SFT with a 95% interval, KL(pi || pi_SFT) estimated from the
samples, reward-model score, fluency, how often the answer ends its turn, where the gold is lost (the
utility's components), and three sample conversations. It also draws figures (SVG, written here, no plotting
library): the gold-vs-KL frontier of PPO, DPO, GRPO and RLOO over a beta sweep (the DPO paper's Figure 2 on
our world) with each method's gold read off at equal KL, reward over-optimisation along a beta = 0 PPO run,
and every stage's training curves. Held out are new conversations, not new tasks (theirs recur in training).

    python evaluate.py                      # the default run's checkpoints -> out/report.md
    python evaluate.py --json_out=True      # also print the numbers as JSON
    python evaluate.py --sweep=True         # first train each method over a beta sweep, then report
    python evaluate.py --ckpt=out/sft.pt,out/ppo.pt --prompts=my_prompts.jsonl
    python evaluate.py --ckpt=out/sft.pt,online=out/online/dpo.pt --bon=0   # name=path names a row
"""
import json
import math
import os
import shutil
import subprocess
import sys

import torch
from tqdm import tqdm

import runtime
from data import world
from data.chat import render_prompt
from data.readers import or_exit, read_prompts
from data.tokenizer import get_tokenizer
from rollout import (best_of_n, grade, percent, prompts_fit, reward_scores, sample_and_grade, summarise,
                     win_rate_against)

# -----------------------------------------------------------------------------
# config (every name can be overridden with --name=value)
out_dir = "out"            # the stages' checkpoints; report.md and figures/ are written here
ckpt = ""                  # comma-separated checkpoints (path or name=path; "bon" = best-of-N); the row
                           # named sft (else out_dir/sft.pt) is the reference; "" = every stage
prompts = ""               # "" = the world's held-out prompts; or a JSONL file of {"prompt"} / {"messages"}
seed = 1234                # sampling seed: every model answers the same prompts with the same random stream
                           # (SFT, the reference of the win rate, with the next seed's)
device = "auto"            # auto: cuda > mps > cpu
dtype = "auto"             # auto: bf16 on CUDA if supported, else fp16; fp32 on CPU
samples = 8                # answers per prompt and model: a few samples per prompt let two runs of the
                           # same model read very differently; the win rate's interval is clustered by
                           # prompt, so more samples narrow it only as far as one prompt's answers differ
max_new_tokens = 48        # longest answer; one cut off here never ended its turn
temperature = 1.0          # each policy as it is: the distribution its KL is measured on
bon = 16                   # best-of-N baseline from SFT with the reward model (0 = skip)
json_out = False           # print the numbers as JSON too
sweep = False              # train the methods below over their betas first (writes out_dir/sweep/)
sweep_methods = ("ppo", "dpo", "grpo", "rloo")  # which methods the sweep trains
# betas besides each default (ppo 0.2, dpo 0.5, grpo 0.6, rloo 0.3), toward the KL range the other methods
# reach; the default run is one more point of each frontier, so it is not trained twice
ppo_betas = (0.05, 0.1)    # PPO: the KL coefficient in the per-token reward
dpo_betas = (0.1, 0.2)     # DPO: the strength of the implicit KL constraint
grpo_betas = (0.3,)        # GRPO: the KL weight in the loss
rloo_betas = (0.1,)        # RLOO: the KL weight in the sequence reward
hack_iters = 120           # length of the beta = 0 PPO run that shows reward over-optimisation (0 = skip)
reward = ""                # reward model for best-of-N and the RM score column ("" = out_dir/reward.pt)
# -----------------------------------------------------------------------------


def svg_plot(path, title, xlabel, ylabel, series):
    """A small line/scatter chart as SVG. series: [(label, xs, ys, color, draw_line)]."""
    W, H, L, R, T, B = 520, 340, 60, 130, 30, 45
    xs = [x for s in series for x in s[1]] or [0, 1]
    ys = [y for s in series for y in s[2]] or [0, 1]
    x0, x1 = min(xs), max(xs) + 1e-9
    pad = 0.05 * (max(ys) + 1e-9 - min(ys))  # a margin above and below the data
    y0, y1 = min(ys) - pad, max(ys) + 1e-9 + pad
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)  # noqa: E731
    sy = lambda y: H - B - (y - y0) / (y1 - y0) * (H - T - B)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2 - R / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
           f'<line x1="{L}" y1="{H - B}" x2="{W - R}" y2="{H - B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H - B}" stroke="black"/>',
           f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">{xlabel}</text>',
           f'<text x="14" y="{(T + H - B) / 2}" text-anchor="middle" '
           f'transform="rotate(-90 14 {(T + H - B) / 2})">{ylabel}</text>']
    for i in range(5):  # ticks
        xv, yv = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{H - B + 14}" text-anchor="middle">{xv:.3g}</text>')
        out.append(f'<text x="{L - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3g}</text>')
    for k, (label, sxs, sys_, color, line) in enumerate(series):
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(sxs, sys_))
        if line and len(sxs) > 1:
            out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        if not line or len(sxs) <= 12:
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>'
                    for x, y in zip(sxs, sys_)]
        out.append(f'<rect x="{W - R + 10}" y="{T + 16 * k}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{W - R + 24}" y="{T + 16 * k + 9}">{label}</text>')
    with open(path, "w") as f:
        f.write("\n".join(out + ["</svg>"]))
    return os.path.basename(path)


def gold_at_kl(points, kl):
    """A method's gold at a given KL, read off its frontier: linear interpolation between the two measured
    (KL, gold) points either side; None outside the KL range the method's runs cover (no extrapolation)."""
    pts = sorted(points)
    for (k0, g0), (k1, g1) in zip(pts, pts[1:]):
        if k0 <= kl <= k1:
            return g0 if k1 == k0 else g0 + (g1 - g0) * (kl - k0) / (k1 - k0)
    return pts[0][1] if len(pts) == 1 and pts[0][0] == kl else None


def sampling_setup():
    """What a frontier point was measured with: a sweep run and this report's rows share the frontier only if
    they answered the same prompts with the same sampling (else the points belong to no one evaluation)."""
    return [prompts or "world", samples, temperature, max_new_tokens, seed]


def run_sweep(rt, eval_prompts, rm_path):
    """Train each method at several betas from the same SFT, reward model and comparisons; evaluate each."""
    runtime.ensure_checkpoint(os.path.join(out_dir, "reward.pt"), "reward.py", out_dir)  # and comparisons
    if not os.path.isfile(os.path.join(out_dir, "comparisons.jsonl")):  # a reward model trained on --data=...
        raise SystemExit(f"error: the sweep needs {out_dir}/comparisons.jsonl; "
                         f"{runtime.command('reward.py', out_dir)} writes it")
    root = os.path.join(out_dir, "sweep")
    script = {m: [f"{m}.py"] for m in ("ppo", "dpo", "grpo")} | {"rloo": ["grpo.py", "--baseline=rloo"]}
    betas = {"ppo": ppo_betas, "dpo": dpo_betas, "grpo": grpo_betas, "rloo": rloo_betas}
    runs = [(m, b, []) for m in sweep_methods for b in betas[m]]
    if hack_iters:  # over-optimisation: beta = 0, trained longer
        runs.append(("ppo", 0.0, [f"--max_iters={hack_iters}", "--n_eval=16", "--eval_samples=1"]))
    results = []
    for method, b, extra in runs:
        d = os.path.join(root, f"{method}_beta{b:g}" + ("_long" if extra else ""))
        os.makedirs(d, exist_ok=True)
        for f in ("sft.pt", "reward.pt", "comparisons.jsonl"):  # every run starts from the same inputs
            shutil.copy(os.path.join(out_dir, f), d)
        args = [*script[method], f"--out_dir={d}", f"--beta={b}", *extra]
        # the script beside this one, as runtime.ensure_checkpoint runs it: whatever the working directory
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), args[0]), *args[1:]]
        print(f"sweep: {' '.join(['python'] + args)}", flush=True)
        with open(os.path.join(d, "train.log"), "w") as log:
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode != 0:
                raise SystemExit(f"error: {' '.join(args)} failed; see {d}/train.log")
        if not extra:
            r = evaluate(rt, {method: os.path.join(d, f"{method}.pt")}, eval_prompts, rm_path)[method]
            results.append({"stage": method, "beta": b, "gold": r["gold"], "kl": r["kl"],
                            "setup": sampling_setup()})
            print(f"  gold {r['gold']:.3f}, KL {r['kl']:.2f}", flush=True)
    text = json.dumps(results, indent=1).encode()
    runtime.write_whole(os.path.join(root, "results.json"), lambda f: f.write(text))  # a kill: no half file


def evaluate(rt, paths, eval_prompts, rm_path, watch=None):
    """{name: checkpoint path (None for best-of-N)} -> {name: metrics}, each model answering eval_prompts x
    samples with the same random stream (seed), SFT with one of its own (seed + 1); SFT (the reference:
    paths["sft"], else out_dir/sft.pt) is always evaluated first. watch: a runtime.Stopwatch."""
    watch = watch or runtime.Stopwatch(rt.device_type)
    sft, enc, _ = runtime.load_model(paths.get("sft") or os.path.join(out_dir, "sft.pt"), "sft", dropout=0.0)
    sft.to(rt.device).eval()
    rm, rm_ck = runtime.load_reward_model(rm_path, rt.device) if os.path.isfile(rm_path) else (None, None)
    evals = eval_prompts * samples
    results = {}
    bar = tqdm(["sft"] + [n for n in paths if n != "sft"], desc="evaluate", unit="model")
    for name in bar:
        bar.set_postfix_str(name)
        # the same prompts for everyone, and the same random stream for every model but the reference:
        # sampling is inverse-CDF, so with SFT's own stream a policy close to SFT would draw SFT's very
        # answers, and the win rate would count ties instead of comparing two independent answers
        g = torch.Generator(device=rt.device).manual_seed(seed + 1 if name == "sft" else seed)
        lap = watch.lap if name != "bon" else (lambda phase: watch.lap(f"best-of-{bon} {phase}"))
        with torch.no_grad(), rt.ctx:
            if name == "bon":  # SFT's answers picked by the reward model; its KL is the analytical bound
                picks = best_of_n(sft, rm, enc, evals, bon, rm_ck["gain"], rm_ck["bias"], max_new_tokens,
                                  temperature, generator=g, lm_weight=rm_ck.get("lm_weight", 0.0), lap=lap,
                                  desc=f"best-of-{bon}")
                res = {**summarise(grade(evals, picks)), "kl": best_of_n_kl_bound(bon),
                       "rm_score": sum(p["score"] for p in picks) / len(picks)}  # scored as it picked
                lap("hidden human")
            else:
                policy = sft if name == "sft" else runtime.load_model(  # (check_rows has read its tokenizer)
                    paths[name], ("base", "sft", "ppo", "grpo", "dpo"), dropout=0.0)[0]
                res = sample_and_grade(policy.to(rt.device).eval(), enc, evals, max_new_tokens, temperature,
                                       generator=g, ref=None if name == "sft" else sft, lap=lap)
            if rm is not None and name != "bon":
                res["rm_score"] = reward_scores(rm, enc, evals, res["samples"], rm_ck["gain"], rm_ck["bias"],
                                                lm_weight=rm_ck.get("lm_weight", 0.0), sft=sft).mean().item()
            lap("scoring")
        if name == "sft":
            sft_samples = res["samples"]
        res["win_vs_sft"], res["win_ci"] = win_rate_against(res["samples"], sft_samples)
        # where the gold is lost: WEIGHTS[k] * (1 - component k), averaged; the parts add up to 1 - gold
        comps = [world.gold_components(s["prompt"], s["text"], s["ended"]) for s in res["samples"]]
        res["missing"] = {k: sum(w * (1 - c[k]) for c in comps) / len(comps)
                          for k, w in world.WEIGHTS.items()}
        lap("hidden human")
        results[name] = res
    return results


def best_of_n_kl_bound(n):
    """KL(best-of-n || SFT) <= ln n - (n - 1) / n, the analytical value (Stiennon et al. 2020,
    https://arxiv.org/abs/2009.01325, appendix); an upper bound, exact only when no two of the n answers can
    coincide (Beirami et al. 2024, https://arxiv.org/abs/2401.01879), and short answers here do repeat."""
    return math.log(n) - (n - 1) / n


def listed_checkpoints():
    """--ckpt's list -> {name: path}: name=path, or a path named by its file; "bon" (best-of-N): None."""
    items = [c.split("=", 1) if "=" in c else (os.path.splitext(os.path.basename(c))[0], c)
             for c in ckpt.split(",")]
    bad = [c for c, (n, p) in zip(ckpt.split(","), items) if not n or not p or n == "bon" and p != "bon"]
    if bad:  # an empty item ("a.pt,,b.pt"), an empty name or path, or a path for the best-of-N row
        raise SystemExit(f"error: --ckpt: {bad[0]!r} is not a path, name=path or bon (which takes no path)")
    items = [(n, None if n == "bon" else p) for n, p in items]
    twice = [n for n, _ in items if sum(m == n for m, _ in items) > 1]
    if twice:
        raise SystemExit(f"error: --ckpt: two rows are named {twice[0]}; name them apart with name=path")
    if "bon" in dict(items) and bon < 1:
        raise SystemExit("error: --ckpt: the best-of-N row needs --bon >= 1")
    missing = [p for n, p in items if p is not None and not os.path.isfile(p)]
    if missing:  # (or a directory)
        raise SystemExit(f"error: --ckpt: {missing[0]}: no such checkpoint file")
    return dict(items)


def check_rows(paths, ref_path, ref_ck, eval_prompts, enc, rm_path=""):
    """Every row's checkpoint, and the reward model that scores them, read before any sampling: one line
    naming the file if it is damaged, of a kind that does not answer (a reward model as a row), of another
    tokenizer than the reference SFT model (its KL or scores would be noise) or a smaller vocabulary, or
    with no room for the longest prompt and max_new_tokens (found now, not after earlier rows are sampled)."""
    longest = max(len(render_prompt(enc, p)) for p in eval_prompts)
    rows = [(p, ("base", "sft", "ppo", "grpo", "dpo")) for p in paths.values() if p not in (None, ref_path)]
    rows += [(rm_path, "reward")] if os.path.isfile(rm_path) else []  # it scores every row's answers
    for path, kinds in [(ref_path, "sft")] + rows:
        if kinds == "reward":  # a head, normalised, finite numbers: refused now, not after a sweep's runs
            ck = runtime.load_reward_model(path, "cpu")[1]
        else:
            ck = ref_ck if path == ref_path else runtime.load_checkpoint(path, kinds)
            runtime.model_from_checkpoint(ck, path)  # its model_args build a network its weights fit, finite
        if ck.get("tokenizer", "world") != ref_ck.get("tokenizer", "world"):
            raise SystemExit(f"error: {path} uses another tokenizer than the SFT model it is compared with")
        runtime.check_vocab(path, ck, enc)
        block = ck["model_args"].get("block_size", 0)
        if longest + max_new_tokens > block:
            raise SystemExit(f"error: {path}: its block_size {block} has no room for the longest prompt "
                             f"({longest} tokens in the chat template) and --max_new_tokens={max_new_tokens}")
        if kinds == "reward":  # normalised on another SFT model's answers, it would misjudge these
            runtime.trained_from(path, ck, ref_ck)


def checkpoints_to_compare(rm_path, listed=None):
    """{name: path}: --ckpt's list, or every stage in out_dir (best-of-N after SFT with a reward model)."""
    if listed:  # (main() has checked that a best-of-N row has its reward model)
        return listed
    paths = {n: os.path.join(out_dir, f"{n}.pt") for n in ("base", "sft", "ppo", "grpo", "rloo", "dpo")}
    paths = {n: p for n, p in paths.items() if os.path.isfile(p)}
    if bon > 0 and os.path.isfile(rm_path):
        paths = {**{k: v for k, v in paths.items() if k in ("base", "sft")}, "bon": None,
                 **{k: v for k, v in paths.items() if k not in ("base", "sft")}}
    return paths


def md_code(text):
    """text as one Markdown code span on one line: its own #, * or fence cannot restructure the report."""
    return "`" + (" ".join(text.replace("`", "'").split()) or "(empty)") + "`"


def write_report(results, order, evals, fig_dir):
    """out_dir/report.md: the table, where the gold is lost, sample conversations, figures."""
    label = {n: f"best-of-{bon}" if n == "bon" else n.replace("|", "\\|") for n in order}  # | splits a row
    where = (f"prompts from {prompts} (the hidden human knows the world's language only: read gold and win "
             "rate with care)") if prompts else "held-out prompts (new conversations, not new tasks)"
    lines = ["# Evaluation report", "",
             f"{len(evals)} {where} x {samples} samples each (temperature {temperature}, seed {seed}). "
             "Gold is the hidden human's utility as a fraction of ideal (ideal answers score 1.0); the win "
             "rate is against an SFT answer to the same prompt, ties counting half, with a 95% interval "
             "clustered by prompt (n/a with one prompt: no spread to measure).", "",
             "| model | gold (of ideal) | win rate vs SFT | KL(pi ‖ SFT) nats | RM score | fluency "
             "| ends turn |", "|---|---|---|---|---|---|---|"]
    for n in order:
        r = results[n]
        rm_s = f"{r['rm_score']:+.2f}" if "rm_score" in r else "-"
        kl = ("≤ " if n == "bon" else "") + f"{r['kl']:.2f}"  # best-of-N's is the analytical upper bound
        lines.append(f"| {label[n]} | {r['gold']:.3f} | {r['win_vs_sft']:.1%} ± {percent(r['win_ci'])} | "
                     f"{kl} | {rm_s} | {r['fluency']:.1%} | {r['ended']:.1%} |")
    lines += ["", "Where the gold is lost: weight x (1 - component) of the hidden human's utility, "
              "averaged over the same samples (a row adds up to 1 - gold):", "",
              "| model | " + " | ".join(world.WEIGHTS) + " |", "|---|" + "---|" * len(world.WEIGHTS)]
    for n in order:
        lines.append(f"| {label[n]} | "
                     + " | ".join(f"{results[n]['missing'][k]:.3f}" for k in world.WEIGHTS) + " |")
    lines += ["", "## Sample conversations", ""]
    for i in range(min(3, len(evals))):
        p = results["sft"]["samples"][i]["prompt"]
        lines += [" / ".join(f"**{m['role']}:** {md_code(m['content'])}" for m in p), ""]
        for n in order:
            s = results[n]["samples"][i]
            lines.append(f"- {label[n]} (gold {s['gold']:.2f}): {md_code(s['text'])}"
                         + ("" if s["ended"] else " *(never ended its turn)*"))
        lines.append("")
    lines += ["## Figures", ""] + draw_figures(results, fig_dir)
    with open(os.path.join(out_dir, "report.md"), "w", errors="backslashreplace") as fh:  # a lone surrogate
        fh.write("\n".join(lines) + "\n")
    return lines


def read_sweep(path):
    """The beta sweep's results ([] before any sweep), each row {stage, beta, gold, kl}. A damaged file is one
    line, and main() reads it before any sampling: it must not cost an evaluation at its very end."""
    redo = f"delete it or run {runtime.command('evaluate.py', out_dir, '--sweep=True')} again"
    try:
        rows = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else []
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or bad UTF-8
        raise SystemExit(f"error: {path} is damaged ({e}); {redo}") from None
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and r.get("stage") in ("ppo", "dpo", "grpo", "rloo")
            and all(type(r.get(k)) in (int, float) and math.isfinite(r[k]) for k in ("beta", "gold", "kl"))
            for r in rows):
        raise SystemExit(f"error: {path} is not a list of {{stage, beta, gold, kl}} rows; {redo}")
    return rows


def draw_figures(results, fig_dir):
    """The gold-vs-KL frontier of the beta sweep, over-optimisation along the beta = 0 PPO run, and every
    stage's training curve, as SVG files in fig_dir; returns the report's lines that show them."""
    os.makedirs(fig_dir, exist_ok=True)
    lines = []
    sw_path = os.path.join(out_dir, "sweep", "results.json")
    sw = read_sweep(sw_path)
    # this report's rows join the sweep's points only if they are the default runs (no --ckpt), measured alike
    ours = {} if ckpt or any(r.get("setup") != sampling_setup() for r in sw) else results
    if sw:
        series = [("SFT", [0.0], [ours["sft"]["gold"]], "black", False)] if ours else []
        if "bon" in ours:  # its KL is the bound, not a measurement
            series.append((f"best-of-{bon} (KL bound)", [ours["bon"]["kl"]], [ours["bon"]["gold"]], "gray",
                           False))
        frontier = {}  # each method's (KL, gold): its sweep runs and, when evaluated above, its default run
        for stage, color in (("ppo", "#1f77b4"), ("dpo", "#ff7f0e"), ("grpo", "#2ca02c"),
                             ("rloo", "#9467bd")):
            pts = [(r["kl"], r["gold"]) for r in sw if r["stage"] == stage]
            pts += [(ours[stage]["kl"], ours[stage]["gold"])] if stage in ours else []
            if pts:
                frontier[stage] = pts = sorted(pts)
                series.append((stage.upper(), [p[0] for p in pts], [p[1] for p in pts], color, True))
        f = svg_plot(os.path.join(fig_dir, "frontier.svg"), "Gold vs KL frontier (beta sweep)",
                     "KL(pi || SFT), nats per answer", "gold (fraction of ideal)", series)
        lines += [f"![frontier](figures/{f})", ""]
        lines += [f"- {r['stage']} beta={r['beta']:g}: gold {r['gold']:.3f}, KL {r['kl']:.2f}"
                  for r in sw] + [f"- {s} default: gold {ours[s]['gold']:.3f}, KL {ours[s]['kl']:.2f}"
                                  for s in frontier if s in ours] + [""]
        if not ours:
            lines += ["(The rows above are not drawn here: other checkpoints, prompts or sampling than the "
                      "sweep's.)", ""]
        kls = [0.5, 1.0, 1.5, 2.0, 3.0]  # gold at equal KL: which method buys more gold per nat
        lo, hi = max(min(pts)[0] for pts in frontier.values()), min(max(pts)[0] for pts in frontier.values())
        if lo <= hi:  # the KL every method's runs cover: the one place all of them can be compared
            kls = sorted(set(kls + [(lo + hi) / 2]))  # unrounded: a one-point frontier is that point only
        lines += ["Gold at equal KL (read off each frontier; blank outside the KL its runs cover):", "",
                  "| KL (nats) | " + " | ".join(s.upper() for s in frontier) + " |",
                  "|---|" + "---|" * len(frontier)]
        for kl in kls:
            cells = [gold_at_kl(frontier[s], kl) for s in frontier]
            lines.append(f"| {kl:.3g} | " + " | ".join("" if g is None else f"{g:.3f}" for g in cells) + " |")
        lines.append("")
    else:
        lines += ["(No beta sweep yet: `python evaluate.py --sweep=True` draws the gold-vs-KL frontier.)",
                  ""]
    hack = runtime.read_log(os.path.join(out_dir, "sweep", "ppo_beta0_long", "ppo.jsonl"))
    if hack:
        kls = [r["kl"] for r in hack]
        f = svg_plot(os.path.join(fig_dir, "overoptimisation.svg"), "PPO with beta = 0: RM score vs gold",
                     "KL(pi || SFT) of the rollout batch", "score",
                     [("RM score (normalised)", kls, [r["score"] for r in hack], "#1f77b4", True),
                      ("gold (hidden human)", kls, [r["gold"] for r in hack], "#d62728", True)])
        lines += [f"![over-optimisation](figures/{f})", ""]
    curves = [("pretrain", "loss", "val_loss"), ("sft", "loss", "val_loss"), ("reward", "loss", "val_loss"),
              ("ppo", "score", "gold"), ("grpo", "score", "gold"), ("rloo", "score", "gold"),
              ("dpo", "loss", "val/loss")]
    for stage, a, b in curves:
        rows = runtime.read_log(os.path.join(out_dir, f"{stage}.jsonl"))
        if not rows:
            continue
        x = list(range(1, len(rows) + 1))
        series = [(a, x, [r.get(a) for r in rows], "#1f77b4", True)]
        pts = [(i, r[b]) for i, r in zip(x, rows) if r.get(b) is not None]
        series += [(b, [p[0] for p in pts], [p[1] for p in pts], "#d62728", True)] if pts else []
        f = svg_plot(os.path.join(fig_dir, f"{stage}.svg"), f"{stage} training", "logged step", "value",
                     series)
        lines += [f"![{stage}](figures/{f})", ""]
    return lines


def main():
    methods = ("ppo", "dpo", "grpo", "rloo")
    runtime.configure(globals(), ranges={"hack_iters": (lambda v: v >= 0, ">= 0"), "sweep_methods": (
        lambda v: set(v) <= set(methods), "a tuple of " + ", ".join(methods)),
        **dict.fromkeys(("ppo_betas", "grpo_betas", "rloo_betas"), (lambda v: min(v, default=0) >= 0,
                                                                    "betas >= 0")),
        "dpo_betas": (lambda v: min(v, default=1) > 0, "betas > 0"),  # refused now, not after a sweep's runs
        "reward": (lambda v: not v or os.path.isfile(v), "a file that exists (\"\": out_dir/reward.pt)"),
        "sweep": (lambda v: not v or hack_iters or any(globals()[f"{m}_betas"] for m in sweep_methods),
                  "False when no method of --sweep_methods has a beta and --hack_iters=0: nothing to train")})
    rt = runtime.setup(device, dtype, seed)
    # ---- 1. the prompts and the checkpoints to compare (a bad file or path is one line, before any sampling)
    if not sweep:  # (a sweep writes the file anew)
        read_sweep(os.path.join(out_dir, "sweep", "results.json"))
    if os.path.isdir(os.path.join(out_dir, "report.md")) or os.path.isfile(os.path.join(out_dir, "figures")):
        raise SystemExit(f"error: {out_dir}/report.md is a directory or {out_dir}/figures a file: the report "
                         "could not be written; move it away")
    eval_prompts = or_exit(read_prompts, prompts) if prompts else world.prompts("eval")
    rm_path = reward or os.path.join(out_dir, "reward.pt")
    listed = listed_checkpoints() if ckpt else {}
    if "bon" in listed and not sweep and not os.path.isfile(rm_path):  # (the sweep builds one)
        raise SystemExit(f"error: --ckpt: the best-of-N row needs a reward model; {rm_path} not found")
    ref_path = listed.get("sft") or os.path.join(out_dir, "sft.pt")  # every row's reference: --ckpt's sft row
    if not os.path.isfile(ref_path):  # to be built (minutes): a damaged file named is one line first
        for f in [p for p in listed.values() if p] + [reward] * bool(reward):
            runtime.load_checkpoint(f, "reward" if f == reward else ("base", "sft", "ppo", "grpo", "dpo"))
    runtime.ensure_checkpoint(ref_path, "sft.py", out_dir)
    ref_ck = runtime.load_checkpoint(ref_path, "sft")
    enc = get_tokenizer(ref_ck.get("tokenizer", "world"))
    if prompts:  # a prompt with no room for its answer: one line now, not a crash after minutes of sampling
        prompts_fit(prompts, eval_prompts, enc, ref_ck["model_args"]["block_size"], max_new_tokens)
    check_rows(checkpoints_to_compare(rm_path, listed), ref_path, ref_ck, eval_prompts, enc, rm_path)
    watch = runtime.Stopwatch(rt.device_type)  # where the time goes: sampling, scoring, the hidden human
    # ---- 2. optionally, PPO, DPO, GRPO and RLOO over a beta sweep first
    if sweep:
        run_sweep(rt, eval_prompts, rm_path)
        watch.lap("beta sweep (training and evaluating its runs)")
    # ---- 3. every model answers the same prompts; the hidden human judges
    paths = checkpoints_to_compare(rm_path, listed)
    results = evaluate(rt, paths, eval_prompts, rm_path, watch)
    order = [n for n in paths if n in results] + [n for n in results if n not in paths]
    # ---- 4. the report and its figures
    fig_dir = os.path.join(out_dir, "figures")  # empty without a sweep or the stages' logs
    lines = write_report(results, order, eval_prompts, fig_dir)
    print("\n".join(lines[:6 + len(order)]))
    print(f"\nwrote {os.path.join(out_dir, 'report.md')} and {len(os.listdir(fig_dir))} figures in {fig_dir}")
    watch.report("evaluate", last="report & figures")
    if json_out:
        print(json.dumps({n: {k: None if v != v else v for k, v in r.items() if k != "samples"}  # nan (one
                          for n, r in results.items()}, indent=1))  # prompt's interval; nan != nan): null


if __name__ == "__main__":
    try:
        runtime.run(main)
    except OSError as e:  # the sweep's or the report's files could not be written (disk full, say): one line
        raise SystemExit(f"error: {e.filename}: {e.strerror or e}") from None
