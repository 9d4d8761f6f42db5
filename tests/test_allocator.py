"""The host allocator setting the training stages apply (`lmpipe.allocator`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lmpipe.allocator import keep_freed_memory

# five training steps of a small MLP (32 MiB activations): the minor page faults they take
PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from lmpipe.allocator import keep_freed_memory
    applied = keep_freed_memory({"LMPIPE_MALLOC": sys.argv[1]})
    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(256, 2048), nn.GELU(), nn.Linear(2048, 256))
    x = torch.randn(4096, 256)
    def step():
        net(x).square().mean().backward()
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def probe(choice: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, choice], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, kept = probe("keep")
    if applied != "True":
        pytest.skip("this C library has no mallopt")
    applied_default, default = probe("default")
    assert applied_default == "False"
    # by default every step's large blocks come back as fresh pages (about 180k faults here);
    # kept, most are reused (13k-33k in runs on the development machine)
    assert default > 50_000
    assert kept < default / 3


def test_the_environment_can_turn_it_off_and_is_checked():
    assert keep_freed_memory({"LMPIPE_MALLOC": "default"}) is False
    with pytest.raises(ValueError, match="LMPIPE_MALLOC='jemalloc'"):
        keep_freed_memory({"LMPIPE_MALLOC": "jemalloc"})


def test_a_stage_reports_a_bad_setting_as_a_user_error(monkeypatch, capsys):
    from lmpipe import stage

    monkeypatch.setenv("LMPIPE_MALLOC", "sometimes")
    with pytest.raises(SystemExit) as exit_:
        stage.run(lambda: None, "pretrain")
    assert exit_.value.code == 2
    assert "pretrain: error: LMPIPE_MALLOC='sometimes'" in capsys.readouterr().err


def test_only_the_training_stages_keep_freed_memory(monkeypatch):
    from lmpipe import stage

    called = []
    monkeypatch.setattr(stage, "keep_freed_memory", lambda: called.append(True) or True)
    monkeypatch.delenv("LMPIPE_NPROC", raising=False)
    for name in ("pretrain", "sft", "reward", "rl", "compress", "export", "evaluate"):
        before = len(called)
        stage.run(lambda: None, name)
        assert (len(called) > before) == (name in ("pretrain", "sft", "reward", "rl")), name
