"""What several test files share: running a script in this process (one that must refuse its input, or a
stage's main() with options), launching one under torchrun, and catching the gradient of each optimizer
step."""
import os
import runpy
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def refusal(monkeypatch, capsys):
    """refusal(script, *args) runs `python script.py args` in this process (a new python spends seconds
    importing torch) and returns the SystemExit message it stops with; nothing may be printed before it.
    Python prints that message as the one line on stderr and exits with 1: tests/test_reliability.py checks
    that once per script in a real subprocess. A refusal that comes too late, once a missing stage is to be
    built (minutes of training), fails at once instead."""
    import runtime
    build = runtime.ensure_checkpoint

    def no_build(path, *a):
        assert os.path.isfile(path), f"{path} is missing: the script went on to build it instead of refusing"
        return build(path, *a)

    def run(script, *args):
        monkeypatch.chdir(ROOT)
        monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, args)])
        monkeypatch.setattr(runtime, "ensure_checkpoint", no_build)
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, f"{script}.py"), run_name="__main__")
        printed = capsys.readouterr()
        assert printed.out == printed.err == "", (script, args, printed)
        return str(e.value)
    return run


@pytest.fixture
def no_tf32():
    """Exact fp32 matmuls on CUDA for the test, the flags restored after: runtime.setup() turns TF32 on for
    the whole process. (monkeypatch cannot undo these: they are properties of torch's backend modules.)"""
    import torch
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    saved = [f.allow_tf32 for f in flags]
    for f in flags:
        f.allow_tf32 = False
    yield
    for f, value in zip(flags, saved):
        f.allow_tf32 = value


def torchrun_launcher():
    """The command that starts a script as two local processes under torchrun (gloo on a CPU); skips the test
    where torchrun is not installed."""
    beside = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(beside) and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    return (beside if os.path.exists(beside) else "torchrun", "--standalone", "--nproc_per_node=2")


def run_here(monkeypatch, module, *argv):
    """module.main() in this process with these options (a new python spends seconds importing torch); the
    config globals main() rebinds are restored after the test, not between two calls in one test: the second
    starts from the options the first set (pass them again to reset them)."""
    for name, value in list(vars(module).items()):
        plain = value is None or type(value) in (int, float, bool, str, tuple, list)
        if not name.startswith("_") and plain:
            monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    return module.main()


def setup_as(monkeypatch, **fields):
    """runtime.setup with some of its answers replaced (master=False: a rank other than 0; world_size=2: one
    of two processes), so a test stands in for another rank without starting one."""
    from types import SimpleNamespace
    import runtime
    real = runtime.setup

    def setup(*args, **kwargs):
        return SimpleNamespace(**{**vars(real(*args, **kwargs)), **fields})
    monkeypatch.setattr(runtime, "setup", setup)


def resume_lines(monkeypatch, capsys, module, flags, said):
    """How often a resumed run of module prints `said` on a rank other than 0, then on rank 0 (a rank > 0
    saves nothing, so both resume the same checkpoint)."""
    counts = []
    for master in (False, True):
        setup_as(monkeypatch, master=master)
        capsys.readouterr()
        run_here(monkeypatch, module, *flags, "--resume=True")
        counts.append(capsys.readouterr().out.count(said))
    return counts


def capture_grads(monkeypatch):
    """A list that every runtime.optimizer_step fills with the step's flattened gradient before it steps."""
    import runtime
    import torch
    grads, step = [], runtime.optimizer_step

    def capture(model, optimizer, scaler, grad_clip):
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        return step(model, optimizer, scaler, grad_clip)
    monkeypatch.setattr(runtime, "optimizer_step", capture)
    return grads
