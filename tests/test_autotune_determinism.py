"""Autotuning never changes results between processes in the default (deterministic) mode
(issue 11): with ``MMLOSS_TRITON_AUTOTUNE=1`` a deterministic launch still takes the tile
table's configuration; only non-deterministic launches (``deterministic=False`` or the atomic
owner variant) go through Triton's autotuner. Pure host logic: no GPU, no compiler."""
import pytest
import torch

from mmloss.ops.triton import _autotune, _config


class FakeKernel:
    """Records how it was launched: ``kernel[grid](**kwargs)``."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda **kw: self.calls.append((grid, kw))


@pytest.fixture
def autotune_on(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MMLOSS_TRITON_AUTOTUNE", "1")
    assert _config.autotuning()


@pytest.fixture
def tuned_spy(monkeypatch):
    """Replaces the autotuner wrapper: records (kernel, kind) instead of building one."""
    seen = []

    def tuned(kernel, kind, atomic_target):
        seen.append((kernel, kind, atomic_target))
        return kernel

    monkeypatch.setattr(_autotune, "_tuned", tuned)
    return seen


@pytest.mark.parametrize("kind", sorted(_config.AUTOTUNE_CANDIDATES))
def test_deterministic_launches_never_autotune(autotune_on, kind):
    assert not _autotune.uses_autotuner(kind, {"ATOMIC_B": False})
    assert not _autotune.uses_autotuner(kind, {})
    assert not _autotune.uses_autotuner(kind, {}, deterministic=True)


@pytest.mark.parametrize("kind", sorted(_config.AUTOTUNE_CANDIDATES))
def test_non_deterministic_launches_autotune(autotune_on, kind):
    assert _autotune.uses_autotuner(kind, {}, deterministic=False)


def test_the_atomic_owner_is_non_deterministic_by_construction(autotune_on):
    # ATOMIC_B runs only with deterministic=False (fp32 atomics sum in run-dependent order), so
    # it may be tuned even when its caller does not pass deterministic=False
    assert _autotune.uses_autotuner("atomic", {"ATOMIC_B": True})


def test_off_without_the_knob_or_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("MMLOSS_TRITON_AUTOTUNE", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not _autotune.uses_autotuner("stats", {}, deterministic=False)
    monkeypatch.setenv("MMLOSS_TRITON_AUTOTUNE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _autotune.uses_autotuner("stats", {}, deterministic=False)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not _autotune.uses_autotuner("combine", {}, deterministic=False)  # no candidates


def test_deterministic_launch_takes_the_table_tiles(autotune_on, tuned_spy):
    t = _config.table_tiles("sm90", torch.bfloat16, "owner")
    kernel = FakeKernel()
    _autotune.launch(kernel, "owner", t, (4, 1, 1), {"n_a": 7, "ATOMIC_B": False})
    assert tuned_spy == []
    assert kernel.calls == [((4, 1, 1), {"n_a": 7, "ATOMIC_B": False, "BLOCK_B": t.block_b,
                                          "BLOCK_K": t.block_k, "num_warps": t.num_warps,
                                          "num_stages": t.num_stages})]


def test_non_deterministic_launch_goes_through_the_autotuner(autotune_on, tuned_spy):
    t = _config.table_tiles("sm90", torch.bfloat16, "stats")
    kernel = FakeKernel()
    _autotune.launch(kernel, "stats", t, (2,), {"n_a": 7}, deterministic=False)
    assert tuned_spy == [(kernel, "stats", "")]
    # the autotuner picks BLOCK_B / warps / stages; BLOCK_K always stays the table's
    assert kernel.calls == [((2,), {"n_a": 7, "BLOCK_K": t.block_k})]
