"""wandb offline by default (a tiny fit's config and metrics in its offline run), and many nodes under
SLURM: the trainer config, the sbatch script's launch and resume logic, and `--ckpt_path last`
taking Lightning's requeue checkpoint."""

import os
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from test_sweep import tiny_options

from retrieval.cli import VTRCLI, lightning_main
from retrieval.data.datamodule import VideoTextDataModule
from retrieval.tools import results
from retrieval.training import RetrievalModule

ROOT = Path(__file__).resolve().parents[1]
MEANPOOL = ["--config", str(ROOT / "experiments/model/meanpool.yaml"),
            "--config", str(ROOT / "experiments/data/synthetic.yaml"), "--config", str(ROOT / "experiments/trainer/cpu.yaml")]


def test_a_fit_logs_its_config_and_metrics_to_an_offline_wandb_run(tmp_path, monkeypatch, capsys):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    runs = tmp_path / "runs"
    try:
        cli = lightning_main(["fit", *MEANPOOL, *tiny_options(), "--config", str(ROOT / "experiments/trainer/wandb.yaml"),
                              f"--trainer.logger.init_args.save_dir={runs}", "--trainer.logger.init_args.name=tiny",
                              "--test_after_fit=true"])
    finally:
        wandb.finish()
    [offline] = (runs / "wandb").glob("offline-run-*")  # offline: written here, nothing sent
    [log] = offline.glob("run-*.wandb")
    data = log.read_bytes()
    assert b'"class_path":"baselines.clip4clip.MeanPool"' in data and b'"test_after_fit":true' in data  # the config
    for metric in (b"val/t2v_R1", b"test/t2v/R@1", b"test/t2v/R@1_lo", b"test/temporal/pair_acc_hi"):  # the metrics
        assert metric in data
    run = runs / "vtr" / cli.trainer.logger.version  # <save_dir>/<project>/<run id>: config, checkpoints, mark
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "checkpoints", "test_results.json"}

    rows = results.main(["results", str(runs), "--out", str(tmp_path / "table"), "--wandb"])
    assert [(r["method"], r["variant"]) for r in rows] == [("MeanPool", "tiny")]
    [table_run] = (tmp_path / "table" / "wandb").glob("offline-run-*")
    assert list(table_run.glob("files/media/table/results/table_*.table.json"))


def test_the_slurm_trainer_config_requeues_on_sigusr1(monkeypatch):
    slurm = yaml.safe_load((ROOT / "experiments/trainer/slurm.yaml").read_text())["trainer"]
    assert (slurm["strategy"], slurm["num_nodes"], slurm["devices"]) == ("ddp", 2, 4)
    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "vtr", "SLURM_NNODES": "1"}.items():
        monkeypatch.setenv(key, value)
    cli = VTRCLI(RetrievalModule, VideoTextDataModule, run=False, args=[
        *MEANPOOL[:4], "--config", str(ROOT / "experiments/trainer/slurm.yaml"), "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.num_nodes=1", "--trainer.precision=32", *tiny_options()])
    environment = cli.trainer._accelerator_connector.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment"
    assert environment.auto_requeue and environment.requeue_signal.name == "SIGUSR1"


def _sbatch(tmp_path: Path, *args: str) -> list[str]:
    """Run experiments/slurm/train.sbatch with a stub `srun` that records its command line."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    (bin_ / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$SLURM_SUBMIT_DIR/srun.args"\n')
    (bin_ / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path),
           "SLURM_JOB_NAME": "seqtransf,seed=1", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "PYTHON": "python"}
    subprocess.run(["bash", str(ROOT / "experiments/slurm/train.sbatch"), *args], env=env, check=True)
    return (tmp_path / "srun.args").read_text().splitlines()


def test_the_sbatch_script_launches_ddp_over_the_job_and_resumes_a_requeued_run(tmp_path):
    header = [line for line in (ROOT / "experiments/slurm/train.sbatch").read_text().splitlines()
              if line.startswith("#SBATCH")]
    options = dict(line.split()[1].lstrip("-").partition("=")[::2] for line in header)
    assert options["ntasks-per-node"] == options["gpus-per-node"] and "requeue" in options
    assert options["signal"].startswith("USR1@")

    line = _sbatch(tmp_path, "experiments/model/seqtransf.yaml", "experiments/data/msrvtt.yaml", "--seed_everything=1")
    text = " ".join(line)
    assert line[:3] == ["--kill-on-bad-exit=1", "python", "-m"] and "fit" in line
    assert "--trainer.num_nodes 2 --trainer.devices 4" in text and "--config experiments/trainer/slurm.yaml" in text
    assert "--trainer.logger.init_args.name seqtransf,seed=1" in text and "--test_after_fit true" in text
    assert "--ckpt_path" not in line and line[-1] == "--seed_everything=1"
    # requeued after a validation: the run has a last.ckpt, the job resumes it
    last = tmp_path / "runs/slurm/seqtransf,seed=1/seqtransf,seed=1/version_0/checkpoints/last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    line = _sbatch(tmp_path, "experiments/model/seqtransf.yaml", "experiments/data/msrvtt.yaml", "--seed_everything=1")
    assert " ".join(line).endswith("--ckpt_path last --seed_everything=1")


class RequeueSignal(L.Callback):
    """What Lightning's SLURM SIGUSR1 handler does, at a chosen step: save ``hpc_ckpt_1.ckpt`` in
    ``default_root_dir``; then the job stops (here: an error)."""

    def __init__(self, after_steps: int) -> None:
        self.after_steps = after_steps

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.after_steps:
            trainer.save_checkpoint(Path(trainer.default_root_dir) / "hpc_ckpt_1.ckpt")
            raise RuntimeError(f"requeued after step {trainer.global_step}")


def test_ckpt_path_last_takes_the_newer_requeue_checkpoint_of_the_same_run(tmp_path):
    root = tmp_path / "job"
    run = [*MEANPOOL, *tiny_options(**{"trainer.max_steps": 4, "trainer.max_epochs": 2}), f"--trainer.default_root_dir={root}",
           f"--trainer.logger.init_args.save_dir={root}", "--trainer.logger.init_args.name=job"]
    with pytest.raises(RuntimeError, match="requeued after step 3"):  # last.ckpt: the validation at step 2
        lightning_main(["fit", *run, "--trainer.callbacks+=test_wandb_slurm.RequeueSignal",
                        "--trainer.callbacks.after_steps=3"])
    resumed = lightning_main(["fit", *run, "--ckpt_path=last", "--test_after_fit=true"])
    config = yaml.safe_load((root / "job" / "version_1" / "config.yaml").read_text())
    assert config["ckpt_path"] == str(root / "hpc_ckpt_1.ckpt")
    assert resumed.trainer.global_step == 4
    checkpoints = root / "job" / "version_0" / "checkpoints"  # the run's checkpoints, selection state kept
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (root / "job" / "version_1" / "checkpoints").exists()
    mark = yaml.safe_load((root / "job" / "version_1" / "test_results.json").read_text())
    assert Path(mark["checkpoint"]).parent == checkpoints and mark["monitor"] == "val/t2v_R1"
