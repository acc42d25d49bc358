"""Which checkpoints count as results: those selected on validation, never on test.

``vtr fit --test_after_fit true`` and ``vtr test`` record in ``test_results.json`` (the mark of a
finished run) the checkpoint they tested and the monitor that selected it; ``vtr results`` reads
that mark, the run's config and the callback states saved in its checkpoints, and refuses a run
whose ``ModelCheckpoint`` monitored a ``test/`` metric.
"""

from __future__ import annotations

from pathlib import Path

TEST_RESULTS = "test_results.json"


class SelectionError(ValueError):
    """A run whose checkpoint was (or could have been) selected on test."""


def callback_states(ckpt: str | Path) -> dict:
    """The callback states a Lightning checkpoint saved (read weights-only, memory-mapped)."""
    import torch

    return torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True).get("callbacks", {})


def selected_by(ckpt: str | Path, states: dict | None = None) -> str | None:
    """The monitor of the ``ModelCheckpoint`` that kept ``ckpt`` as one of its best (None: no
    monitor did, e.g. ``last.ckpt``), from the callback states saved in it."""
    name = Path(ckpt).name
    for key, state in (callback_states(ckpt) if states is None else states).items():
        kept = [*state.get("best_k_models", {}), state.get("best_model_path") or ""]
        if key.startswith("ModelCheckpoint") and state.get("monitor") and name in {Path(p).name for p in kept}:
            return state["monitor"]
    return None


def refuse_test_monitors(run: Path, monitors, where: str) -> None:
    """Raise :class:`SelectionError` naming ``run`` and the monitor if any monitor is a ``test/`` metric."""
    for monitor in monitors:
        if str(monitor or "").startswith("test/"):
            raise SelectionError(f"{run}: its ModelCheckpoint monitored {monitor!r} ({where}): a checkpoint selected "
                                 "on test is not a result; select on a val/ metric and test again")
