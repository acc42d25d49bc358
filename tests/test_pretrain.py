"""The pretrained vtr-tiny: its checksum over tensors, the manifest, the fixed thread count and kernels."""

import json
from dataclasses import replace

import pytest
import torch

from retrieval.backbone import create_clip
from retrieval.pretrain import KERNEL_ENV, PretrainConfig, backbone_checksum, pretrained_backbone

TINY = PretrainConfig(steps=2, batch_size=8, num_frames=32, warmup_steps=1, threads=1, kernels=None)


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    return create_clip("vtr-tiny").state_dict()


def test_checksum_is_over_tensors_not_the_container(state, tmp_path):
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    # the same values as views into one larger storage: another pickle, other bytes on disk
    flat = torch.cat([tensor.reshape(-1) for tensor in state.values()] + [torch.zeros(7)])
    views, start = {}, 0
    for name, tensor in state.items():
        views[name] = flat[start:start + tensor.numel()].view(tensor.shape)
        start += tensor.numel()
    torch.save(dict(reversed(list(views.items()))), tmp_path / "views.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "lightning.ckpt")
    files = ("zip.pt", "legacy.pt", "views.pt", "lightning.ckpt")
    assert len({(tmp_path / name).read_bytes() for name in files}) == len(files)
    checksums = {backbone_checksum(tmp_path / name) for name in files}
    assert len(checksums) == 1
    checksum = checksums.pop()
    assert checksum.startswith("sha256:") and len(checksum) == 7 + 64


def test_checksum_sees_values_names_dtypes_and_shapes(state, tmp_path):
    torch.save(state, tmp_path / "a.pt")
    reference = backbone_checksum(tmp_path / "a.pt")
    name = "visual.proj"
    changes = {
        "value": {**state, name: state[name].clone().index_put_((torch.tensor(0), torch.tensor(0)),
                                                                torch.tensor(float(state[name][0, 0]) + 1e-6))},
        "name": {**{k: v for k, v in state.items() if k != name}, name + "_": state[name]},
        "dtype": {**state, name: state[name].double()},
        "shape": {**state, name: state[name].reshape(-1)},
        "missing": {k: v for k, v in state.items() if k != name},
    }
    for what, changed in changes.items():
        torch.save(changed, tmp_path / f"{what}.pt")
        assert backbone_checksum(tmp_path / f"{what}.pt") != reference, what
    torch.save({**state, "note": torch.tensor([1])}, tmp_path / "extra.pt")
    assert backbone_checksum(tmp_path / "extra.pt") != reference
    torch.save({**state, "step": 3}, tmp_path / "int.pt")
    with pytest.raises(TypeError, match=r"'step' is not a tensor \(int\)"):
        backbone_checksum(tmp_path / "int.pt")


def test_pretraining_records_its_checksum_and_threads_and_repeats_exactly(tmp_path):
    threads = torch.get_num_threads()
    path = pretrained_backbone(TINY, cache_dir=tmp_path / "a", progress=False)
    assert torch.get_num_threads() == threads  # the pretraining's own count is restored after
    manifest = json.loads(path.with_suffix(".json").read_text())
    assert manifest["checksum"] == backbone_checksum(path)
    assert manifest["built_with"]["threads"] == TINY.threads == manifest["config"]["threads"]
    assert manifest["built_with"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    again = pretrained_backbone(TINY, cache_dir=tmp_path / "b", progress=False)
    assert backbone_checksum(again) == manifest["checksum"]
    assert pretrained_backbone(TINY, cache_dir=tmp_path / "a", progress=False) == path  # cached


def test_pinned_kernels_build_in_a_subprocess_that_runs_them(tmp_path, monkeypatch):
    for name in KERNEL_ENV["avx2"]:
        monkeypatch.delenv(name, raising=False)
    config = replace(TINY, kernels="avx2")
    path = pretrained_backbone(config, cache_dir=tmp_path, progress=False)
    assert path.name.endswith("-t1-avx2.pt") and path != pretrained_backbone(TINY, cache_dir=tmp_path, progress=False)
    built_with = json.loads(path.with_suffix(".json").read_text())["built_with"]
    assert {name: built_with[name] for name in KERNEL_ENV["avx2"]} == KERNEL_ENV["avx2"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert built_with["cpu_capability"] == "AVX2"
    assert json.loads(path.with_suffix(".json").read_text())["checksum"] == backbone_checksum(path)
    with pytest.raises(ValueError, match="unknown PretrainConfig.kernels 'avx9'"):
        pretrained_backbone(replace(TINY, kernels="avx9"), cache_dir=tmp_path, progress=False)
