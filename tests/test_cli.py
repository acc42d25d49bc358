"""`vtr fit` / `vtr test` through LightningCLI on generated data: every recipe YAML builds, the
model's shapes are linked into the data, runs keep their folders, and `--ckpt_path last` resumes
a run exactly."""

import csv
from pathlib import Path

import pytest
import torch
import yaml

from retrieval.cli import VTRCLI, lightning_main, main
from retrieval.data.datamodule import VideoTextDataModule
from retrieval.recipes import (build_retriever, checkpoint_recipe, model_fingerprint, read_checkpoint, read_recipe,
                               retriever_from_checkpoint)
from retrieval.retriever import Retriever
from retrieval.training import RetrievalModule

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted((ROOT / "experiments" / "model").glob("*.yaml"))
VARIANTS = sorted((ROOT / "experiments" / "ablations").glob("*.yaml"))
RECIPES = METHODS + VARIANTS
# DESIGN.md: Prompt Switch, CLIP2Video, STAN and CLIP4Clip (meanP, seqTransf) are fusion-free;
# X-CLIP, X-Pool, GLCCL and CLIP4Clip tightTransf are text-conditioned
FUSION_FREE = {
    "clip2video": True, "meanpool": True, "prompt_switch": True, "seqtransf": True, "stan": True,
    "glccl": False, "tighttransf": False, "xclip": False, "xpool": False,
    "prompt_switch_aggregation_new_lr": True, "prompt_switch_no_captioner": True,
}


def recipe_files(path: Path) -> list[Path]:
    """A recipe, or a variant (experiments/ablations/, only its change) after the recipe it varies:
    the method whose stem its own stem starts with."""
    if path.parent.name != "ablations":
        return [path]
    (base,) = [m for m in METHODS if path.stem.startswith(m.stem + "_")]
    return [base, path]


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_builds_on_the_tiny_backbone(recipe):
    model = build_retriever(read_recipe(*recipe_files(recipe))["model"]["retriever"],
                            {"backbone": "vtr-tiny", "pretrained": None})
    assert isinstance(model, Retriever)
    assert model.fusion_free is FUSION_FREE[recipe.stem]


def test_fit_then_test_on_generated_data(tmp_path):
    common = [
        "--config", str(ROOT / "experiments/data/synthetic.yaml"),
        "--config", str(ROOT / "experiments/trainer/cpu.yaml"),
        "--data.root", str(tmp_path / "synthetic"),
        "--data.synthetic_num_train", "16", "--data.synthetic_num_val", "8", "--data.synthetic_num_test", "8",
        "--data.batch_size", "8",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
    ]
    model = ["--model.retriever.class_path", "baselines.clip4clip.SeqTransf", "--model.retriever.init_args.num_frames", "4"]
    main(["fit", *common, *model, "--trainer.max_steps", "2"])
    version = tmp_path / "runs" / "lightning_logs" / "version_0"
    best = sorted((version / "checkpoints").glob("best-*.ckpt"))
    assert best, "fit saves the checkpoint selected on val/t2v_R1"
    # the whole checkpoint is tensors and plain data (hparams included): the tools read it weights-only
    checkpoint = read_checkpoint(best[0])
    hparams = checkpoint["hyper_parameters"]
    assert hparams["optim"]["lr"] > 0 and hparams["retriever"]["class_path"] == "baselines.clip4clip.SeqTransf"
    rebuilt = build_retriever(hparams["retriever"], ckpt=best[0])
    assert all(torch.equal(t, checkpoint["state_dict"][f"retriever.{k}"]) for k, t in rebuilt.state_dict().items())
    main(["test", "--config", str(version / "config.yaml"), "--ckpt_path", str(best[0]),
          "--trainer.logger.init_args.save_dir", str(tmp_path / "test_runs")])
    metrics = (tmp_path / "test_runs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    for key in ("test/t2v/R@1", "test/v2t/MnR", "test/static/R@1", "test/temporal/pair_acc"):
        assert key in metrics


def _refused(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *args])
    assert exit_.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("recipe", METHODS, ids=[p.stem for p in METHODS])
def test_recipes_set_frames_words_and_backbone_once(recipe):
    cli = VTRCLI(RetrievalModule, VideoTextDataModule, run=False, args=[
        "--config", str(recipe), "--config", str(ROOT / "experiments/data/synthetic.yaml"),
        "--model.retriever.init_args.backbone", "vtr-micro", "--model.retriever.init_args.pretrained", "null",
        "--model.retriever.init_args.num_frames", "6", "--model.retriever.init_args.max_words", "16", "--data.frame_segments", "6"])
    init = yaml.safe_load(recipe.read_text())["model"]["retriever"]["init_args"]
    data = cli.datamodule.hparams
    assert (data.backbone, data.num_frames, data.max_words) == ("vtr-micro", 6, 16)
    retriever = cli.model.retriever
    assert (retriever.clip.name, retriever.num_frames, retriever.max_words) == ("vtr-micro", 6, 16)
    assert cli.datamodule.eval_num_frames == init.get("eval_num_frames", 6)


def test_linked_settings_are_refused_on_the_data_side(tmp_path, capsys):
    seqtransf = str(ROOT / "experiments/model/seqtransf.yaml")
    err = _refused(capsys, "--config", seqtransf, "--data.num_frames", "8")
    assert '"data.num_frames" must be given via "model.retriever.init_args.num_frames"' in err
    old = tmp_path / "old_data.yaml"
    old.write_text("data:\n  dataset: synthetic\n  num_frames: 8\n")
    err = _refused(capsys, "--config", seqtransf, "--config", str(old))
    assert f"{old}: data.num_frames=8 contradicts model.retriever.init_args.num_frames=12" in err
    err = _refused(capsys, "--config", str(ROOT / "experiments/model/prompt_switch.yaml"), "--data.eval_num_frames", "6")
    assert "data.eval_num_frames=6 contradicts model.retriever.init_args.eval_num_frames=12" in err
    micro = ["--model.retriever.init_args.backbone", "vtr-micro", "--model.retriever.init_args.pretrained", "null"]
    err = _refused(capsys, "--config", str(ROOT / "experiments/model/xclip.yaml"), *micro, "--data.eval_num_frames", "8")
    assert "data.eval_num_frames=8 does not fit XCLIP (model.retriever.init_args.num_frames=12)" in err
    err = _refused(capsys, "--config", str(ROOT / "experiments/model/xpool.yaml"), *micro, "--model.retriever.init_args.num_frames", "6")
    assert "model.retriever.init_args.num_frames=6 is not a multiple of data.frame_segments=12" in err


def test_help_lists_the_tools_and_no_predict(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "{fit,validate,test}" in out
    for tool in ("compare", "bench", "index", "search", "sweep", "prepare", "pretrain"):
        assert f"\n  {tool} " in out
    with pytest.raises(SystemExit):
        main(["predict"])
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def _tiny_run(tmp_path, save_dir, *extra) -> list[str]:
    """tightTransf (dropout 0.1) on vtr-micro: 40 training clips = 20 pairs, 4 pairs a batch: 5
    batches an epoch, validated every 2 batches (steps 2, 4, 7, 9, 12); uniform frames."""
    return [
        "fit", "--config", str(ROOT / "experiments/model/tighttransf.yaml"),
        "--config", str(ROOT / "experiments/data/synthetic.yaml"), "--config", str(ROOT / "experiments/trainer/cpu.yaml"),
        "--model.retriever.init_args.backbone", "vtr-micro", "--model.retriever.init_args.pretrained", "null",
        "--model.retriever.init_args.num_frames", "4", "--model.retriever.init_args.num_cross_layers", "1",
        "--data.root", str(tmp_path / "synthetic"), "--data.synthetic_num_train", "40",
        "--data.synthetic_num_val", "8", "--data.synthetic_num_test", "8", "--data.batch_size", "8",
        "--data.train_sampling", "uniform",
        "--trainer.max_epochs", "3", "--trainer.max_steps", "12", "--trainer.val_check_interval", "2",
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def test_a_fit_checkpoint_alone_rebuilds_the_trained_retriever(tmp_path):
    # LightningCLI hands RetrievalModule its own "given" hyperparameters (the parsed config and an
    # `_instantiator`); the module saves an explicit dict instead: the retriever's config as built
    cli = lightning_main(_tiny_run(tmp_path, tmp_path / "runs", "--trainer.max_steps", "2"))
    trained = cli.model.retriever
    last = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = read_checkpoint(last)  # weights-only: plain data
    assert checkpoint["global_step"] == cli.trainer.global_step == 2  # the final weights
    hparams = checkpoint["hyper_parameters"]
    assert set(hparams) == {"retriever", "optim", "eval_chunk_size"}
    assert hparams["retriever"] == trained.config
    assert hparams["retriever"]["class_path"] == "baselines.clip4clip.TightTransf"
    assert hparams["retriever"]["init_args"]["quick_gelu"] is False  # the activation as built, not None
    assert (hparams["retriever"]["init_args"]["num_cross_layers"], hparams["optim"]["lr"]) == (1, 1e-4)
    assert all(key.startswith("retriever.") for key in checkpoint["state_dict"])
    recipe = checkpoint_recipe(last)
    assert recipe["model"]["retriever"] == trained.config
    assert not any(key.startswith("_") for key in recipe["data"])
    assert (recipe["data"]["num_frames"], recipe["data"]["backbone"]) == (4, "vtr-micro")

    rebuilt = retriever_from_checkpoint(last)  # from the checkpoint alone: no recipe, no CLI
    assert type(rebuilt) is type(trained) and not rebuilt.training
    assert rebuilt.config == trained.config
    assert model_fingerprint(rebuilt) == model_fingerprint(trained)
    expected = trained.state_dict()
    assert rebuilt.state_dict().keys() == expected.keys()
    assert all(torch.equal(t, expected[k]) for k, t in rebuilt.state_dict().items())


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, capsys):
    whole = lightning_main(_tiny_run(tmp_path, tmp_path / "whole"))
    runs = tmp_path / "interrupted" / "lightning_logs"
    assert "no run under" in _refused(capsys, *_tiny_run(tmp_path, tmp_path / "interrupted")[1:], "--ckpt_path", "last")
    with pytest.raises(RuntimeError, match="interrupted after step 8"):
        lightning_main(_tiny_run(tmp_path, tmp_path / "interrupted", "--trainer.callbacks+=fakes.Interrupt",
                                 "--trainer.callbacks.after_steps=8"))
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (7, 1)  # the validation after epoch 1's 2nd batch
    assert saved["VideoTextDataModule"] == {"epoch": 1, "batches_done": 2}

    resumed = lightning_main(_tiny_run(tmp_path, tmp_path / "interrupted", "--ckpt_path", "last"))
    assert resumed.trainer.global_step == whole.trainer.global_step == 12
    final, expected = resumed.model.state_dict(), whole.model.state_dict()
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    val = {k: float(v) for k, v in whole.trainer.callback_metrics.items() if k.startswith("val/")}
    points = {k for k in val if not k.endswith(("_lo", "_hi"))}
    assert len(points) == 11 + 3  # the retrieval metrics and val/t2v_R1, plus the synthetic views
    # every R@K (6), static / temporal R@1 (2) and the pair accuracy (1) carry their interval
    assert {k for k in val if k.endswith("_lo")} == {f"{k}_lo" for k in points if "R@" in k or "pair_acc" in k} \
        and len(val) == len(points) + 2 * 9
    assert {k: float(v) for k, v in resumed.trainer.callback_metrics.items() if k.startswith("val/")} == val
    # the resumed part logs beside its own config; the checkpoints stay with the run it continues
    config = yaml.safe_load((runs / "version_1" / "config.yaml").read_text())
    assert config["ckpt_path"] == str(last)
    assert not (runs / "version_1" / "checkpoints").exists()
    with open(runs / "version_0" / "metrics.csv") as handle:  # the interrupted part's log is kept
        assert [r["step"] for r in csv.DictReader(handle) if r["val/t2v/R@1"]] == ["1", "3", "6"]
    best = sorted(p.name for p in (runs / "version_0" / "checkpoints").glob("best-*.ckpt"))
    assert best == sorted(p.name for p in (tmp_path / "whole/lightning_logs/version_0/checkpoints").glob("best-*.ckpt"))


def test_every_wandb_run_keeps_its_config_beside_its_checkpoints(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")  # WandbLogger(offline=True) switches it to offline
    wandb_yaml = str(ROOT / "experiments/trainer/wandb.yaml")
    folders = []
    for _ in range(2):
        cli = lightning_main(_tiny_run(tmp_path, tmp_path / "runs", "--config", wandb_yaml, "--trainer.max_steps", "2",
                                       "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")))
        folders.append(Path(cli.trainer.checkpoint_callback.dirpath).parent)
        wandb.finish()
    assert folders[0] != folders[1] and folders[0].parent == folders[1].parent == tmp_path / "runs" / "vtr"
    for folder in folders:
        assert (folder / "config.yaml").is_file() and (folder / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "runs" / "config.yaml").exists()
