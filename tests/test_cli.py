"""`vtr fit` / `vtr test` through LightningCLI on generated data, and every recipe YAML builds."""

from pathlib import Path

import pytest
import torch

from retrieval.bench import build_method, read_checkpoint, read_recipe
from retrieval.cli import main
from retrieval.module import RetrievalModule

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "experiments" / "model").glob("*.yaml")) + sorted((ROOT / "experiments" / "ablations").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_builds_on_the_tiny_backbone(recipe):
    model = build_method(read_recipe(recipe)["model"], {"backbone": "vtr-tiny", "pretrained": None})
    assert isinstance(model, RetrievalModule)
    assert type(model).offline in (True, False)


def test_fit_then_test_on_generated_data(tmp_path):
    common = [
        "--config", str(ROOT / "experiments/data/synthetic.yaml"),
        "--config", str(ROOT / "experiments/trainer/cpu.yaml"),
        "--data.root", str(tmp_path / "synthetic"),
        "--data.synthetic_num_train", "16", "--data.synthetic_num_val", "8", "--data.synthetic_num_test", "8",
        "--data.batch_size", "8", "--data.num_frames", "4",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
    ]
    model = ["--model", "baselines.clip4clip.SeqTransf", "--model.num_frames", "4"]
    main(["fit", *common, *model, "--trainer.max_steps", "2"])
    version = tmp_path / "runs" / "lightning_logs" / "version_0"
    best = sorted((version / "checkpoints").glob("best-*.ckpt"))
    assert best, "fit saves the checkpoint selected on val/t2v_R1"
    # the whole checkpoint is tensors and plain data (hparams included): the tools read it weights-only
    checkpoint = read_checkpoint(best[0])
    hparams = checkpoint["hyper_parameters"]
    assert hparams["optim"]["lr"] > 0 and hparams["_class_path"] == "baselines.clip4clip.SeqTransf"
    rebuilt = build_method({"class_path": hparams["_class_path"],
                            "init_args": {k: v for k, v in hparams.items() if not k.startswith("_")}}, ckpt=best[0])
    assert all(torch.equal(t, checkpoint["state_dict"][k]) for k, t in rebuilt.state_dict().items())
    main(["test", "--config", str(version / "config.yaml"), "--ckpt_path", str(best[0]),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "test_runs")])
    metrics = (tmp_path / "test_runs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for key in ("test/t2v/R@1", "test/v2t/MnR", "test/static/R@1", "test/temporal/pair_acc"):
        assert key in metrics
