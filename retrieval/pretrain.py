"""A pretrained tiny CLIP for the synthetic world, built once and cached.

Every method in the papers fine-tunes from CLIP; on the embedded default they fine-tune from
this: ``vtr-tiny`` trained contrastively on single frames of the synthetic world against their
static descriptions (``retrieval.data.synthetic.still_frames``), the way CLIP is pretrained on
image-text pairs. Without it a tiny ViT trained from scratch needs 10-15 CPU-minutes before any
temporal head can learn order (reference/synthetic.md): the frame encoder is the bottleneck.

The checkpoint is an open_clip state dict, so methods load it through the ordinary
``pretrained=<path>`` route of ``CLIPBackbone``. It is cached (not shipped: 32 MB of fp32
weights, 80 % of them the token-embedding table, and rebuilt from the seed on CPU in a few
minutes) under ``$VTR_CACHE/backbones`` with a manifest of the parameters it was built with,
its ``backbone_checksum`` and the ``kernel_environment`` that built it; a cache entry with
other parameters is never reused.

Rebuilt bit-for-bit on any x86-64 CPU with AVX2 for the same torch build: the data (still
frames drawn in numpy, no video files), the initialisation and the batch order come from the
seed alone, the thread count is fixed (``PretrainConfig.threads``) and so is the CPU code of
ATen, oneDNN and MKL (``PretrainConfig.kernels``: their AVX2 kernels, also on a CPU with
AVX-512). Without those two pins a CPU with other kernels or another core count gives other
last bits from the first step on, and 600 steps amplify them into another backbone (on this
project's machine, 2.2 points of MeanPool's pair accuracy). Compare ``backbone_checksum``
values, not file hashes.

``vtr pretrain`` prints the path of the default one (building it first if needed), for
``vtr fit ... --model.retriever.init_args.pretrained "$(vtr pretrain)"``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
from tqdm.auto import tqdm

from retrieval.backbone import create_clip
from retrieval.data.datamodule import default_cache_dir
from retrieval.data.synthetic import still_frames
from retrieval.data.transforms import ClipTransform, backbone_image_size, normalize_frames
from retrieval.losses import symmetric_infonce
from retrieval.training import warmup_cosine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainConfig:
    """What the cached backbone is a function of (its cache key)."""

    backbone: str = "vtr-tiny"
    steps: int = 600
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    num_frames: int = 40_000
    seed: int = 0
    difficulty: str = "easy"
    threads: int = 2
    """torch's intra-op threads while pretraining. CPU kernels split reductions (the backward
    pass's weight and bias gradients) by thread count, so the weights depend on it: one step
    at 1 and at 2 threads gave 39 of 110 gradients that differ in their last bits, and 30
    steps different weights. Fixed here, not the machine's core count (torch's default); 2 is
    the core count of the machine the README's tables were measured on."""
    kernels: str | None = "avx2"
    """The CPU code ATen, oneDNN and MKL run while pretraining: ``"avx2"`` limits all three to
    their AVX2 kernels (``KERNEL_ENV``), so a CPU with AVX-512 builds the same weights as one
    with AVX2 only; ``None`` lets each library take the best the CPU has, and the weights then
    depend on the CPU. The libraries read the setting once, when first used, so the backbone is
    built in a subprocess started with it (unless this process already runs with it)."""
    format_version: int = 1


KERNEL_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}}
"""Environment variables that pin each ``PretrainConfig.kernels`` level. Measured on this
project's 2-core AMD EPYC (AVX-512): one pretraining step under ``ATEN_CPU_CAPABILITY=avx2``
changed 109 of 110 gradients, under ``ONEDNN_MAX_CPU_ISA=AVX2`` all 110, and a whole backbone
built under both gave, fine-tuned, exactly the README table's numbers (measured on 22 November on a
CPU without AVX-512); ``MKL_CBWR=AVX2`` changed nothing here (probably because MKL does not
use AVX-512 on AMD CPUs) and pins MKL on Intel CPUs with AVX-512. The AVX2 kernels were also faster here:
20 steps at batch 256 in 6 s against 9-10 s."""


def _architecture_hash(backbone: str) -> str:
    """Short hash of the open_clip config, so a changed architecture never reuses old weights."""
    config = json.dumps(open_clip.get_model_config(backbone), sort_keys=True)
    return hashlib.sha256(config.encode()).hexdigest()[:8]


def _cache_path(config: PretrainConfig, cache_dir: Path) -> Path:
    key = (f"{config.backbone}-{_architecture_hash(config.backbone)}-synthetic-{config.difficulty}"
           f"-s{config.steps}-b{config.batch_size}-seed{config.seed}-t{config.threads}-{config.kernels or 'native'}")
    return cache_dir / "backbones" / f"{key}.pt"


def pretrained_backbone(config: PretrainConfig = PretrainConfig(), cache_dir: str | Path | None = None,
                        progress: bool = True) -> Path:
    """Path to the pretrained checkpoint for ``config``, building it if it is not cached.

    Args:
        config: pretraining parameters.
        cache_dir: defaults to ``$VTR_CACHE`` (``~/.cache/vtr``).
        progress: show a progress bar while building.
    """
    path = _cache_path(config, Path(cache_dir) if cache_dir else default_cache_dir())
    manifest = path.with_suffix(".json")
    if path.is_file() and manifest.is_file() and json.loads(manifest.read_text()).get("config") == asdict(config):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pinned = KERNEL_ENV.get(config.kernels, {}) if config.kernels else {}
    if config.kernels and not pinned:
        raise ValueError(f"unknown PretrainConfig.kernels {config.kernels!r}; expected one of {sorted(KERNEL_ENV)} or None")
    if all(os.environ.get(name) == value for name, value in pinned.items()):
        _build(config, path, progress)
    else:
        _build_in_subprocess(config, path, progress, pinned)
    return path


def _build(config: PretrainConfig, path: Path, progress: bool) -> None:
    """Trains ``config`` in this process and writes the checkpoint and its manifest to ``path``."""
    start = time.perf_counter()
    with torch_threads(config.threads):
        state, final_loss = _train(config, progress)
        environment = kernel_environment()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    minutes = (time.perf_counter() - start) / 60
    path.with_suffix(".json").write_text(json.dumps(
        {"config": asdict(config), "final_loss": final_loss, "minutes": minutes, "checksum": backbone_checksum(path),
         "built_with": environment}, indent=1))
    log.info("pretrained %s in %.1f min (final loss %.3f) -> %s", config.backbone, minutes, final_loss, path)


def _build_in_subprocess(config: PretrainConfig, path: Path, progress: bool, pinned: dict[str, str]) -> None:
    """``_build`` in a fresh interpreter whose environment carries ``pinned`` (and finds this code)."""
    package_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **pinned,
           "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    code = ("import json, sys\nfrom pathlib import Path\nfrom retrieval.pretrain import PretrainConfig, _build\n"
            "_build(PretrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2]), sys.argv[3] == '1')")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(config)), str(path), str(int(progress))],
                          env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"pretraining {config.backbone} with {pinned} failed in its subprocess "
                           f"(exit status {done.returncode}; its error is printed above)")


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Runs the block with ``torch.set_num_threads(count)``, restoring the previous count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def kernel_environment() -> dict:
    """What CPU results depend on besides code, data and seed (record it beside them).

    The torch build; ATen's kernel ISA (``torch.backends.cpu.get_cpu_capability()``: AVX512,
    AVX2 or DEFAULT, the best the CPU has unless ``ATEN_CPU_CAPABILITY`` lowers it); torch's
    thread count now; whether oneDNN is enabled and the environment variables that pin the
    ISA of oneDNN (``ONEDNN_MAX_CPU_ISA``) and MKL (``MKL_CBWR``). Two runs with different
    values here are not expected to agree bit for bit.
    """
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available() and
            torch.backends.mkldnn.enabled,
            **{name: os.environ.get(name) for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}}


def backbone_checksum(path: str | Path) -> str:
    """``"sha256:<hex>"`` over a checkpoint's tensors, not over the file.

    The state dict (or a Lightning checkpoint's ``state_dict``) is read with
    ``weights_only=True``; for each entry in sorted name order the digest takes a header
    (the name, the dtype, the shape) and the tensor's bytes, contiguous, in the machine's byte
    order (little-endian wherever PyTorch ships).
    The pickle container is left out: its bytes change with the serialisation format and
    with how tensors share storage while the weights stay equal. Two machines that built
    ``vtr-tiny`` to the same checksum start every method from the same weights.

    Raises:
        TypeError: An entry of the state dict is not a tensor.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{path}: entry {name!r} is not a tensor ({type(tensor).__name__})")
        tensor = tensor.detach().contiguous().reshape(-1)
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{tuple(state[name].shape)}\0".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def _train(config: PretrainConfig, progress: bool) -> tuple[dict[str, torch.Tensor], float]:
    torch.manual_seed(config.seed)
    model = create_clip(config.backbone)
    size = backbone_image_size(config.backbone)[0]
    context = model.positional_embedding.shape[0]
    frames, descriptions = still_frames(config.num_frames, seed=config.seed, size=size, difficulty=config.difficulty)
    mask = torch.ones(len(frames), dtype=torch.bool)
    images = normalize_frames(ClipTransform((size, size))(frames, mask.numpy()), mask)  # [N, 3, S, S]
    tokens = open_clip.get_tokenizer(config.backbone, context_length=context)(descriptions)  # [N, context]
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = min(config.warmup_steps, config.steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, config.steps, warmup))
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    loss = torch.tensor(0.0)
    for _ in tqdm(range(config.steps), desc=f"pretraining {config.backbone} on synthetic frames", disable=not progress):
        batch = torch.randint(len(images), (config.batch_size,), generator=generator)
        image_features = torch.nn.functional.normalize(model.encode_image(images[batch]), dim=-1)
        text_features = torch.nn.functional.normalize(model.encode_text(tokens[batch]), dim=-1)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        # identical descriptions in a batch are positives of each other, not negatives
        same = tokens[batch][:, None, :].eq(tokens[batch][None, :, :]).all(-1)
        logits = logits.masked_fill(same & ~torch.eye(len(batch), dtype=torch.bool), float("-inf"))
        targets = torch.arange(len(batch))
        loss = symmetric_infonce(logits, logits.T, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
    return model.state_dict(), loss.item()


def main(argv: Sequence[str]) -> None:
    """``vtr pretrain``: print the path of the default pretrained backbone, building it if needed."""
    parser = argparse.ArgumentParser(
        prog="vtr pretrain",
        description="Print the path of vtr-tiny pretrained on synthetic frames (what `vtr compare` fine-tunes "
                    "from), cached under $VTR_CACHE/backbones; the first call builds it (about 3 CPU-minutes).")
    parser.parse_args(list(argv[1:]) if argv and argv[0] == "pretrain" else list(argv))
    print(pretrained_backbone())
