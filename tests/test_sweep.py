"""`vtr sweep`: runs named by their grid point, tested on the checkpoint selected on validation,
finished points skipped, an interrupted one resumed, the `vtr results` table at the end; the
wandb sweep YAML's `command:` runs one such point."""

import os
from pathlib import Path

import pytest
import yaml

from retrieval.cli import lightning_main, main
from retrieval.tools import sweep

ROOT = Path(__file__).resolve().parents[1]
TINY = {  # vtr-micro on 16 + 8 + 8 generated clips: 2 steps an epoch, validated after each
    "model.retriever.init_args.backbone": "vtr-micro", "model.retriever.init_args.pretrained": None,
    "model.retriever.init_args.num_frames": 4, "data.synthetic_num_train": 16, "data.synthetic_num_val": 8,
    "data.synthetic_num_test": 8, "data.batch_size": 8, "data.train_sampling": "uniform", "trainer.max_steps": 2,
    "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False,
}


def tiny_args(**changes) -> dict:
    """TINY, with the generated clips shared by this session's tests (under its $VTR_CACHE)."""
    return {**TINY, "data.root": str(Path(os.environ["VTR_CACHE"]) / "tiny-synthetic"), **changes}


def tiny_options(**changes) -> list[str]:
    return [f"--{key}={sweep._text(value)}" for key, value in tiny_args(**changes).items()]


@pytest.fixture
def subprocess_env(monkeypatch):
    """The runs are `python -m retrieval.cli fit` processes: they import this checkout."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def test_points_are_named_by_their_values(tmp_path, capsys):
    assert sweep.parse_point(["--model.optim.lr=0.0001", "--model.retriever.init_args.num_temporal_layers", "4"]) == [
        ("model.optim.lr", "0.0001"), ("model.retriever.init_args.num_temporal_layers", "4")]
    assert sweep.point_name([("model.optim.lr", "0.0001"), ("seed_everything", "2")]) == "lr=0.0001,seed_everything=2"
    assert sweep.point_name([("model.optim.lr", "1"), ("data.lr", "2")]) == "model.optim.lr=1,data.lr=2"  # shared last part
    assert sweep.point_name([("data.dataset", "a b/c"), ("x", "[1, 2]")]) == "dataset=a-b-c,x=-1,-2-"
    assert sweep.point_name([]) == "default"
    with pytest.raises(ValueError, match="--key=value"):
        sweep.parse_point(["lr=1"])

    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  model.optim.lr: [1.0e-4, 3.0e-4]\n  seed_everything: [0]\n")
    out = tmp_path / "sweep"
    finished = out / "lr=0.0003,seed_everything=0" / "version_0"  # a finished run of the 2nd point
    finished.mkdir(parents=True)
    (finished / "config.yaml").write_text(yaml.safe_dump(
        {"trainer": {"logger": {"init_args": {"name": "lr=0.0003,seed_everything=0"}}}}))
    (finished / "test_results.json").write_text("{}")
    extra = str(ROOT / "experiments/trainer/cpu.yaml")
    sweep.main(["sweep", "--grid", str(grid), "--out", str(out), "--dry-run", "--config", extra, "--trainer.max_steps=3"])
    printed = capsys.readouterr()
    lines = printed.out.strip().splitlines()
    assert len(lines) == 1 and "2/2] lr=0.0003,seed_everything=0: finished in" in printed.err
    assert lines[0].endswith(f"fit --config {extra} --model.optim.lr=0.0001 --seed_everything=0 --trainer.max_steps=3 "
                             f"--trainer.logger.init_args.save_dir={out} "
                             "--trainer.logger.init_args.name=lr=0.0001,seed_everything=0 --test_after_fit=true")
    with pytest.raises(SystemExit, match="config nowhere.yaml does not exist"):
        sweep.main(["sweep", "--config", "nowhere.yaml", "--dry-run"])


def test_a_sweep_resumes_an_interrupted_point_skips_finished_ones_and_ends_with_the_table(
        tmp_path, monkeypatch, capsys, subprocess_env):
    grid, out = tmp_path / "grid.yaml", tmp_path / "sweep"
    configs = [str(ROOT / f"experiments/{p}.yaml") for p in ("model/meanpool", "data/synthetic", "trainer/cpu")]
    grid.write_text(yaml.safe_dump({"configs": configs, "args": tiny_args(**{"trainer.max_steps": 4, "trainer.max_epochs": 2}),
                                    "grid": {"seed_everything": [0, 1]}}))
    spec = sweep.read_grid(grid)
    # point 1 is interrupted after step 3: its last.ckpt is the validation at step 2
    interrupted = sweep.command(spec, [("seed_everything", "0")], [], out)[3:]
    with pytest.raises(RuntimeError, match="interrupted after step 3"):
        lightning_main([*interrupted, "--trainer.callbacks+=fakes.Interrupt", "--trainer.callbacks.after_steps=3"])
    first = out / "seed_everything=0"
    assert not (first / "version_0" / "test_results.json").exists()

    sweep.main(["sweep", "--grid", str(grid), "--out", str(out)])
    printed = capsys.readouterr().out
    assert f"[vtr sweep 1/2] seed_everything=0 (resumes {first / 'version_0'})" in printed
    assert "2 of 2 runs started here succeeded" in printed
    resumed = yaml.safe_load((first / "version_1" / "config.yaml").read_text())
    assert resumed["ckpt_path"] == str(first / "version_0" / "checkpoints" / "last.ckpt")
    mark = yaml.safe_load((first / "version_1" / "test_results.json").read_text())
    assert mark["monitor"] == "val/t2v_R1" and mark["seed"] == 0 and "test/t2v/R@1_lo" in mark["metrics"]
    assert Path(mark["checkpoint"]).parent == first / "version_0" / "checkpoints"  # the whole run's selection
    assert (out / "seed_everything=1" / "version_0" / "test_results.json").is_file()
    table = (out / "table.md").read_text()
    assert "| MeanPool |  | synthetic |  | 0 1 | " in table and table in printed

    # run again: every point is finished, nothing is started, the table is written again
    monkeypatch.setattr(sweep.subprocess, "run", lambda *a, **k: pytest.fail(f"started {a}"))
    sweep.main(["sweep", "--grid", str(grid), "--out", str(out)])
    printed = capsys.readouterr()
    assert printed.err.count("finished in") == 2 and "0 of 0 runs started here" in printed.out
    assert sorted(p.name for p in first.iterdir()) == ["version_0", "version_1"]


def test_the_wandb_sweep_command_runs_one_named_tested_point(tmp_path, monkeypatch, capsys, subprocess_env):
    spec = yaml.safe_load((ROOT / "experiments/sweeps/wandb_seqtransf.yaml").read_text())
    command = spec["command"]
    assert command[:2] == ["vtr", "sweep"] and command[-2:] == ["--point", "${args}"]
    # what a wandb agent substitutes: --<parameter>=<value>, one value of each parameter
    values = {k: p["values"][0] if "values" in p else p["min"] for k, p in spec["parameters"].items()}
    agent_args = [f"--{key}={value}" for key, value in values.items()]
    # the same command on a tiny config: CPU, generated clips instead of MSR-VTT
    swap = {"experiments/data/msrvtt.yaml": "experiments/data/synthetic.yaml",
            "experiments/trainer/gpu.yaml": "experiments/trainer/cpu.yaml"}
    line = [swap.get(arg, arg) for arg in command]
    line[line.index("--out") + 1] = str(tmp_path / "sweep")
    point = line.index("--point")
    line = [*line[:point], *tiny_options(), "--point", *agent_args]
    monkeypatch.chdir(ROOT)  # the configs are relative to the repository root
    main(line[1:])  # `vtr sweep ...`, its run a subprocess with WANDB_MODE=disabled

    name = "lr=3e-05,clip_lr=1e-07,num_temporal_layers=2"
    [run] = [c.parent for c in (tmp_path / "sweep").rglob("config.yaml") if "wandb" not in c.parts]
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]["init_args"]["name"] == name
    assert (run / "test_results.json").is_file() and run.parent.name == "vtr"  # the wandb project's folder
    assert f"| SeqTransf | {name} | synthetic |" in (tmp_path / "sweep" / "table.md").read_text()
    main(line[1:])  # the agent hands out the same point again: skipped
    assert "finished in" in capsys.readouterr().err
