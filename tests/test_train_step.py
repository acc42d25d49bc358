"""``vtr bench train`` on vtr-micro on the CPU: the step it times trains (weights move), its FLOPs
are forward + backward (a matmul's backward costs twice its forward), and the CSV's derived
columns follow from the measured ones."""

import csv
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from retrieval.recipes import build_retriever, model_fingerprint, read_recipe
from retrieval.bench.latency import main as bench_main
from retrieval.bench.train_step import COLUMNS, count_flops, make_step, random_batch
from retrieval.training import RetrievalModule

ROOT = Path(__file__).resolve().parents[1]
MICRO = {"backbone": "vtr-micro", "pretrained": None}


def micro(method: str = "meanpool") -> RetrievalModule:
    """The recipe's retriever on vtr-micro, in a RetrievalModule with the recipe's optimiser (as `vtr bench train`)."""
    recipe = read_recipe(ROOT / f"experiments/model/{method}.yaml")["model"]
    return RetrievalModule(build_retriever(recipe["retriever"], MICRO), recipe["optim"])


def test_a_linear_steps_flops_are_three_forwards():
    layer = nn.Linear(8, 16)
    x = torch.randn(5, 8)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)

    def step():
        optimizer.zero_grad()
        layer(x).sum().backward()
        optimizer.step()

    # forward 2*5*8*16; backward: the weight's gradient and the input's (x needs none: weight only)
    assert count_flops(step) == 2 * 5 * 8 * 16 * 2


def test_a_methods_step_counts_backward_and_scales_with_the_batch():
    model = micro()
    assert all(p.requires_grad for p in model.parameters())
    counts = {}
    for b in (2, 4):
        batch = random_batch(model, b, 4, torch.device("cpu"))
        with FlopCounterMode(display=False) as forward:
            model.retriever.encode_video(batch["frames"], batch["frame_mask"])
            model.retriever.encode_text(batch["tokens"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            counts[b] = count_flops(make_step(model, batch, "fp32"))
        # every weight trains: backward = 2x forward, less the first conv's input gradient (frames need none)
        assert 2.7 * forward.get_total_flops() < counts[b] <= 3 * forward.get_total_flops()
    assert counts[4] == pytest.approx(2 * counts[2], rel=0.01)  # the B x B logits are a negligible part


def test_the_timed_step_trains_the_model():
    model = micro()
    before = model_fingerprint(model.retriever)
    step = make_step(model, random_batch(model, 3, 4, torch.device("cpu")), "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [float(step()) for _ in range(2)]
    assert model_fingerprint(model.retriever) != before and all(torch.isfinite(torch.tensor(losses)))


def test_command_writes_a_row_per_method(tmp_path):
    bench_main(["bench", "train", "--config", str(ROOT / "experiments/model/meanpool.yaml"),
                "--config", str(ROOT / "experiments/model/xclip.yaml"), "--backbone", "vtr-micro", "--batch", "3",
                "--frames", "4", "--warmup", "1", "--steps", "2", "--peak-tflops", "2", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("train_*_bf16_*.csv")
    with open(path) as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS
        rows = list(reader)
    assert [(r["method"], r["backbone"], r["batch"], r["num_frames"]) for r in rows] == \
        [("meanpool", "vtr-micro", "3", "4"), ("xclip", "vtr-micro", "3", "4")]
    for r in rows:
        seconds = float(r["step_ms_median"]) / 1e3
        assert float(r["clips_per_s"]) == pytest.approx(3 / seconds, rel=1e-4)
        assert float(r["achieved_tflops"]) == pytest.approx(float(r["tflop_per_step"]) / seconds, rel=1e-4)
        assert float(r["mfu"]) == pytest.approx(float(r["achieved_tflops"]) / 2, rel=1e-4)


def test_bad_options_are_named(tmp_path):
    config = str(ROOT / "experiments/model/meanpool.yaml")
    with pytest.raises(SystemExit, match="--batch"):
        bench_main(["bench", "train", "--config", config, "--batch", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--config"):
        bench_main(["bench", "train", "--out", str(tmp_path)])
