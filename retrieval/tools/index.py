"""``vtr index``: the offline stage written to a file (``vtr search`` queries it: :mod:`retrieval.tools.search`).

- ``vtr index [--config RECIPE.yaml [VARIANT.yaml]] --ckpt CKPT|none --data DATA.yaml [key=value ...] --out
  index.safetensors`` builds the method from its recipe (the same ``model`` section ``vtr fit`` reads) or,
  without ``--config``, from the checkpoint alone (its saved retriever and data settings), loads the
  checkpoint's weights, and encodes every video of a split once with ``encode_video`` and
  ``prepare_gallery``. The file
  is a safetensors file (tensors and JSON, nothing that runs on load): the ``features`` (the
  ``VideoFeatures`` fields the method caches, whatever they are: one embedding for fusion-free
  methods, frame or token features for text-conditioned ones), and in its metadata the
  ``video_ids``, ``class_path`` and ``init_args`` (to rebuild the method), the checkpoint's path
  (relative to the index's folder, and absolute), the seed and the method's fingerprint
  (:func:`~retrieval.recipes.model_fingerprint`: sha256 of its config and every weight). It is
  written to a temporary file renamed into place, so an interrupted run leaves no half-written
  index; an existing file is never replaced without ``--overwrite``.
- ``vtr search --index index.safetensors "a red square moves left" [-k 5]`` rebuilds the method,
  refuses it unless its fingerprint is the index's, encodes the query with ``encode_text`` and
  ranks the stored gallery with ``score_gallery`` + top-k: the same three stages as training,
  evaluation and the latency benchmark. ``--faiss`` (fusion-free methods, ``faiss-cpu``
  installed) ranks with a flat inner-product FAISS index instead; the scores are the same logits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import retrieval
from retrieval.bench.results import atomic_path
from retrieval.data.datamodule import VideoTextDataModule
from retrieval.data.transforms import normalize_frames
from retrieval.features import VideoFeatures
from retrieval.recipes import (
    build_retriever,
    checkpoint_recipe,
    model_fingerprint,
    read_recipe,
    retriever_from_checkpoint,
)
from retrieval.retriever import Retriever

log = logging.getLogger(__name__)

SPLIT_STAGES = {"val": "validate", "test": "test"}


# ---------------------------------------------------------------------- data
def data_arguments(recipe: dict[str, Any], data: Sequence[str], backbone: str) -> dict[str, Any]:
    """``VideoTextDataModule`` arguments: the recipe's ``data`` section, then each ``data`` item.

    Args:
        recipe: the method's recipe (its ``data`` section fixes frames and words).
        data: YAML files (a LightningCLI config with a ``data:`` section, or flat keys) and
            ``key=value`` overrides (values parsed as YAML), applied in order.
        backbone: the method's backbone: it always sets the data's image size and tokenizer.
    """
    args: dict[str, Any] = dict(recipe.get("data") or {})
    for item in data:
        if "=" in item and not Path(item).is_file():
            key, value = item.split("=", 1)
            args[key.removeprefix("data.")] = yaml.safe_load(value)
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"--data {item!r} is neither a YAML file nor key=value")
        loaded = yaml.safe_load(path.read_text()) or {}
        args.update(loaded.get("data", loaded) if isinstance(loaded, dict) else {})
    if args.get("backbone", backbone) != backbone:
        log.warning("data backbone %r replaced by the method's %r (image size, tokenizer)", args["backbone"], backbone)
    return {**args, "backbone": backbone}


def make_datamodule(args: dict[str, Any]) -> VideoTextDataModule:
    """``VideoTextDataModule(**args)`` with a clear error for an unknown option."""
    try:
        return VideoTextDataModule(**args)
    except TypeError as error:
        raise ValueError(f"bad --data option: {error}") from None


def encode_split(model: Retriever, datamodule: VideoTextDataModule, split: str,
                 device: str = "cpu") -> tuple[list[str], VideoFeatures]:
    """Encode every video of ``split`` once (the offline stage, then ``prepare_gallery``), in dataset order.

    Returns:
        ``(video_ids, features)`` with ``features`` on the CPU.
    """
    if split not in SPLIT_STAGES:
        raise ValueError(f"split must be one of {sorted(SPLIT_STAGES)}; got {split!r}")
    datamodule.prepare_data()
    datamodule.setup(SPLIT_STAGES[split])
    loaders = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    model = model.to(device).eval()
    indices, parts = [], []
    with torch.inference_mode():
        for batch in loaders[0]:
            mask = batch["frame_mask"].to(device)
            video = model.encode_video(normalize_frames(batch["frames"].to(device), mask), mask)
            parts.append(model.prepare_gallery(video).to("cpu"))
            indices.append(batch["video_index"])
    order = torch.cat(indices).argsort()
    records = datamodule.records(split)
    return [records[i].video_id for i in torch.cat(indices)[order].tolist()], VideoFeatures.cat(parts)[order]


# ---------------------------------------------------------------------- index
FORMAT = "vtr-index/3"
"""The safetensors metadata ``format`` of an index (vtr's first indexes were pickles: refused;
``/2`` held methods of the LightningModule shape, before ``Retriever``)."""
_FEATURE = "features."
_KEYS = {"video_ids", "class_path", "init_args", "ckpt", "ckpt_absolute", "seed", "fingerprint", "fusion_free"}


def build_index(
    config: str | Path | Sequence[str | Path] | None,
    out: str | Path,
    ckpt: str | None = None,
    data: Sequence[str] = (),
    split: str = "test",
    overrides: dict[str, Any] | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    seed: int = 0,
) -> Path:
    """``vtr index``: encode a split's videos once and save them with what rebuilds the method.

    Args:
        config: the method's recipe YAML (and variants, merged in order), or None: the
            retriever and the data settings saved in ``ckpt``.
        out: the index file to write.
        ckpt: Lightning checkpoint, or None for the recipe's weights (random or pretrained).
        data: ``--data`` items (see :func:`data_arguments`).
        split: ``val`` or ``test``.
        overrides: replaced ``init_args`` (e.g. ``backbone``, ``pretrained``).
        overwrite: replace an existing ``out``.
        device: where to encode.
        seed: seeds the initialisation (reproducible random weights without ``ckpt``).

    Raises:
        FileExistsError: ``out`` exists and ``overwrite`` is False (checked before any work).
        ValueError: neither ``config`` nor ``ckpt`` is given.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if config is None:
        if ckpt is None:
            raise ValueError("an index needs a checkpoint (--ckpt) or a recipe (--config)")
        model = retriever_from_checkpoint(ckpt, overrides, seed)
        recipe = checkpoint_recipe(ckpt)
    else:
        recipe = read_recipe(*([config] if isinstance(config, (str, Path)) else config))
        model = build_retriever(recipe["model"]["retriever"], overrides, ckpt, seed)
    datamodule = make_datamodule(data_arguments(recipe, data, model.clip.name))
    video_ids, features = encode_split(model, datamodule, split, device)
    ckpt_path = None if ckpt is None else Path(ckpt).resolve()
    meta = {
        "video_ids": video_ids,
        **model.config,
        "ckpt": None if ckpt_path is None else os.path.relpath(ckpt_path, out.resolve().parent),
        "ckpt_absolute": None if ckpt_path is None else str(ckpt_path),
        "seed": seed,
        "fingerprint": model_fingerprint(model),
        "fusion_free": bool(model.fusion_free),
        "split": split,
        "vtr": retrieval.__version__,
    }
    tensors = {_FEATURE + name: t.contiguous() for name, t in features.as_dict().items()}
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata={"format": FORMAT, "index": json.dumps(meta)})
    log.info("indexed %d %s videos of %s into %s", len(video_ids), split, config or ckpt, out)
    return out


def load_index(path: str | Path) -> dict[str, Any]:
    """An index written by :func:`build_index`: its metadata, ``features`` and ``path``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a vtr index (a pickle, such as an index in vtr's first
            format or a crafted file, is refused: it is never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index {path} does not exist (build it with `vtr index`)")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path} is not a vtr index: not a safetensors file ({error}); indexes are never "
                         "unpickled, so one written by an older vtr (torch.save) must be rebuilt with `vtr index`") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a vtr index (safetensors metadata format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    index = json.loads(metadata.get("index", "{}"))
    missing = sorted(_KEYS - set(index))
    if missing:
        raise ValueError(f"{path} is not a complete vtr index: its metadata lacks {missing}")
    index["features"] = {name.removeprefix(_FEATURE): t for name, t in tensors.items() if name.startswith(_FEATURE)}
    index["path"] = str(path)
    return index


def indexed_checkpoint(index: dict[str, Any]) -> str | None:
    """The checkpoint that built ``index``: its path relative to the index's folder, else where
    it was when indexed; None when the index was built without one.

    Raises:
        FileNotFoundError: the checkpoint is at neither place.
    """
    if index["ckpt"] is None:
        return None
    beside = Path(index["path"]).parent / index["ckpt"]
    for candidate in (beside, Path(index["ckpt_absolute"])):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"the checkpoint that built {index['path']} is neither at {beside} (relative to the "
                            f"index) nor at {index['ckpt_absolute']}; pass it with --ckpt")


# ---------------------------------------------------------------------- command line
def _overrides(backbone: str | None, pretrained: str, ckpt: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if backbone:
        out["backbone"] = backbone
    if pretrained == "recipe":
        if ckpt is not None:
            out["pretrained"] = None  # the checkpoint's weights replace them: no download
    else:
        out["pretrained"] = None if pretrained.lower() == "none" else pretrained
    return out


def none_or(value: str | None) -> str | None:
    """A ``--ckpt`` value: None for ``none``."""
    return None if value is None or value.lower() == "none" else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtr index", description="Encode a split's videos once (offline).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", nargs="+", type=Path, default=None,
                        help="method recipe YAML (experiments/model/) and variants; default: the retriever "
                             "and data saved in --ckpt")
    parser.add_argument("--ckpt", default=None, help="Lightning checkpoint, or 'none' for the recipe's weights")
    parser.add_argument("--data", nargs="*", default=[],
                        help="data YAML files and key=value options of VideoTextDataModule, in order")
    parser.add_argument("--split", choices=sorted(SPLIT_STAGES), default="test")
    parser.add_argument("--out", required=True, type=Path, help="index file (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--backbone", default=None, help="replace the recipe's backbone (e.g. vtr-tiny)")
    parser.add_argument("--pretrained", default="recipe",
                        help="'recipe' (none when --ckpt is given), 'none', or a tag/path")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")
    return parser


def main(argv: Sequence[str]) -> None:
    """``vtr index ...`` (``argv[0]`` is the tool name)."""
    args = build_parser().parse_args(list(argv[1:]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        ckpt = none_or(args.ckpt)
        out = build_index(args.config, args.out, ckpt, args.data, args.split,
                          _overrides(args.backbone, args.pretrained, ckpt), args.overwrite, args.device, args.seed)
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(f"vtr index: {error}") from None
    print(f"wrote {out}")
