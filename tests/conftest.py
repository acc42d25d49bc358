"""Shared test configuration: CPU only, no loggers, quiet, deterministic."""

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).parent))  # tests/fakes.py
torch.set_num_threads(min(2, torch.get_num_threads()))
logging.getLogger("root").setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning

# the shared/ folder beside the checkout (CI), or $VTR_SHARED (a worktree elsewhere)
SHARED = Path(os.environ.get("VTR_SHARED") or Path(__file__).resolve().parents[1].parent / "shared")


@pytest.fixture(scope="session", autouse=True)
def _vtr_cache(tmp_path_factory):
    """What the code writes under $VTR_CACHE (video probe results, ...) stays in pytest's tmp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VTR_CACHE", str(tmp_path_factory.mktemp("vtr-cache")))
        yield


@pytest.fixture
def trainer_kwargs(tmp_path):
    """A Trainer shrunk for tests (lightning-hydra-template style)."""
    return dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
