"""A retriever from a recipe, or from a checkpoint alone.

Methods are data, not code: a recipe (``experiments/model/<name>.yaml``) is a LightningCLI
YAML whose ``model`` section is ``RetrievalModule``'s (``retriever: {class_path, init_args}``,
``optim``, evaluation options), and a variant (``experiments/ablations/``) is an extra YAML
holding only its change. ``vtr fit --config recipe.yaml --config variant.yaml`` merges them,
and every tool reads them through the same jsonargparse parser (:func:`read_recipe`), so a
tool never imports ``baselines``.

A checkpoint alone rebuilds its retriever (:func:`retriever_from_checkpoint`): the
architecture comes from the ``retriever`` config saved in its hyperparameters (the activation
as built), the weights from its ``state_dict``. Opening a file runs no code: checkpoints are
read with ``torch.load(weights_only=True)`` (tensors and plain data only; a Lightning
checkpoint of this project is plain data: its hyperparameters are saved as dicts), and
indexes are safetensors files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import open_clip
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from torch import Tensor

from retrieval.backbone import weights_quick_gelu
from retrieval.data.datamodule import MODEL_SETTINGS, VideoTextDataModule
from retrieval.retriever import Retriever
from retrieval.training import RetrievalModule

log = logging.getLogger(__name__)

TWO_STAGE = "retrieval.two_stage.TwoStage"
RETRIEVER_KEY = "retriever."  # the state-dict prefix of the retriever inside RetrievalModule


def recipe_parser() -> ArgumentParser:
    """The parser of ``vtr fit``'s config sections that the tools read: ``model``
    (``RetrievalModule``), ``data`` (``VideoTextDataModule``, with the model's shapes linked in
    as ``vtr fit`` links them), ``trainer`` and ``seed_everything`` (kept as data)."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(RetrievalModule, "model")
    parser.add_class_arguments(VideoTextDataModule, "data")
    parser.add_argument("--trainer", type=dict | None, default=None)
    parser.add_argument("--seed_everything", type=int | bool, default=0)
    for key in MODEL_SETTINGS:
        parser.link_arguments(f"model.retriever.init_args.{key}", f"data.{key}")
    return parser


def read_recipe(*paths: str | Path) -> dict[str, Any]:
    """A recipe and its variants, merged in order (``recipe.yaml``, ``variant.yaml`` ...), as
    plain data: ``{model: {retriever: {class_path, init_args}, optim, ...}, data, trainer,
    seed_everything}``. The data's ``num_frames``, ``max_words`` and backbone are the model's
    (linked), and so is ``eval_num_frames`` for a method that fixes it (Prompt Switch).

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file does not parse as a recipe (the message names it and the option),
            or a data section contradicts a setting linked from the model.
    """
    if not paths:
        raise ValueError("read_recipe needs at least one recipe file")
    args = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        args += ["--config", str(path)]
    try:
        config = recipe_parser().parse_args(args)
    except Exception as error:  # jsonargparse's ArgumentError: name the files
        raise ValueError(f"{' + '.join(map(str, paths))}: not a vtr recipe: {error}") from None
    recipe = config.as_dict()
    recipe.pop("config", None)
    retriever_args = recipe["model"]["retriever"].get("init_args") or {}
    if retriever_args.get("eval_num_frames") is not None:
        recipe["data"]["eval_num_frames"] = retriever_args["eval_num_frames"]
    for path in paths:
        _refuse_linked_data(Path(path), recipe)
    return recipe


def _refuse_linked_data(path: Path, recipe: dict[str, Any]) -> None:
    """A file's ``data.num_frames`` (etc.) that differs from the model's would be dropped by
    the link: refuse it (an equal one, as older saved configs hold, is accepted)."""
    loaded = yaml.safe_load(path.read_text()) or {}
    data = loaded.get("data") if isinstance(loaded, dict) else None
    model = recipe["model"]["retriever"].get("init_args") or {}
    for key in (*MODEL_SETTINGS, "eval_num_frames"):
        if isinstance(data, dict) and key in data and key in model and data[key] != model[key]:
            raise ValueError(f"{path}: data.{key}={data[key]!r} contradicts model.retriever.init_args.{key}="
                             f"{model[key]!r}; data.{key} is the model's (linked): set it under the model only")


def context_length(backbone: str) -> int:
    """The text context of an open_clip model config (``vtr-tiny``: 32, CLIP: 77)."""
    config = open_clip.get_model_config(backbone)
    if config is None:
        raise ValueError(f"unknown backbone {backbone!r}: no open_clip model config of that name")
    return config["text_cfg"].get("context_length", 77)


def build_retriever(
    config: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    ckpt: str | Path | None = None,
    seed: int = 0,
) -> Retriever:
    """Instantiate a retriever from ``{class_path, init_args}`` (a recipe's ``model.retriever``,
    or a checkpoint's saved ``retriever``), as ``vtr fit`` would.

    Args:
        config: ``{class_path, init_args}``.
        overrides: ``init_args`` to replace, e.g. ``{"backbone": "vtr-tiny", "pretrained": None}``
            to run a ViT-B/32 recipe on the tiny backbone. When the backbone changes and the
            recipe's ``max_words`` exceeds the new backbone's context, ``max_words`` is lowered
            to that context (logged). Dropping the recipe's pretrained weights on its own
            backbone keeps their activation.
        ckpt: a Lightning checkpoint of a ``RetrievalModule`` (or a retriever's plain state
            dict) whose weights are loaded strictly.
        seed: seeds the random initialisation, so two builds without ``ckpt`` are identical.

    Returns:
        The retriever in eval mode on the CPU.
    """
    if config.get("class_path") == TWO_STAGE:
        return build_two_stage(config.get("init_args") or {}, overrides, seed)
    config = copy.deepcopy(config)
    recipe_args = dict(config.get("init_args") or {})
    init_args = {**recipe_args, **(overrides or {})}
    if _weights_dropped(recipe_args, init_args):
        # the checkpoint's weights replace the recipe's: build the activation those were trained with
        init_args["quick_gelu"] = weights_quick_gelu(recipe_args["backbone"], recipe_args["pretrained"])
    backbone = init_args.get("backbone")
    if backbone is not None and init_args.get("max_words", 0) > context_length(backbone):
        log.warning("max_words=%s exceeds %s's text context: using %s", init_args["max_words"], backbone,
                    context_length(backbone))
        init_args["max_words"] = context_length(backbone)
    config["init_args"] = init_args
    L.seed_everything(seed, verbose=False)
    retriever = Retriever.from_config(config)
    if ckpt is not None:
        load_weights(retriever, ckpt)
    return retriever.eval()


def saved_retriever(ckpt: str | Path) -> dict[str, Any]:
    """The ``{class_path, init_args}`` a ``RetrievalModule`` checkpoint saved of its retriever.

    Raises:
        ValueError: the file is not such a checkpoint (see :func:`read_checkpoint`).
    """
    payload = read_checkpoint(Path(ckpt))
    config = (payload.get("hyper_parameters") or {}).get("retriever") if isinstance(payload, dict) else None
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"checkpoint {ckpt} has no saved retriever config (hyper_parameters.retriever): not a "
                         "checkpoint of this version of vtr's RetrievalModule; pass the recipe with --config")
    return config


def checkpoint_recipe(ckpt: str | Path) -> dict[str, Any]:
    """What a ``RetrievalModule`` checkpoint saved of its recipe: ``{model: {retriever}, data}``
    (the data section from Lightning's ``datamodule_hyper_parameters``)."""
    data = read_checkpoint(Path(ckpt)).get("datamodule_hyper_parameters") or {}
    return {"model": {"retriever": saved_retriever(ckpt)},
            "data": {k: v for k, v in data.items() if not k.startswith("_")}}


def retriever_from_checkpoint(ckpt: str | Path, overrides: dict[str, Any] | None = None, seed: int = 0) -> Retriever:
    """The retriever of a ``RetrievalModule`` checkpoint, from the checkpoint alone: its saved
    config with ``pretrained=None`` (the weights are the checkpoint's: nothing is downloaded;
    the activation is the one saved), then its weights."""
    return build_retriever(saved_retriever(ckpt), {"pretrained": None, **(overrides or {})}, ckpt, seed)


def build_two_stage(init_args: dict[str, Any], overrides: dict[str, Any] | None = None, seed: int = 0):
    """A :class:`~retrieval.two_stage.TwoStage` from ``{recaller, reranker, k}``.

    Each part is ``{ckpt: CKPT}`` (the retriever saved in a checkpoint, :func:`retriever_from_checkpoint`),
    ``{config: RECIPE.yaml[, ckpt: CKPT]}`` (the recipe's retriever, then the checkpoint's
    weights) or ``{class_path, init_args, ckpt}`` (what a built one records). Paths are kept
    absolute, so an index rebuilds the pair from anywhere.

    Raises:
        ValueError: a part or ``k`` is missing or malformed (the message names it).
    """
    from retrieval.two_stage import TwoStage

    if not isinstance(init_args.get("k"), int):
        raise ValueError(f"a two-stage retriever needs an int 'k' in its init_args, got {init_args.get('k')!r}")
    parts, spec = {}, {}
    for role in ("recaller", "reranker"):
        part = init_args.get(role)
        if not isinstance(part, dict) or not ({"config", "class_path", "ckpt"} & set(part)):
            raise ValueError(f"two-stage '{role}' must be {{ckpt: CKPT}}, {{config: RECIPE.yaml, ckpt: CKPT}} or "
                             f"{{class_path, init_args, ckpt}}, got {part!r}")
        ckpt = None if part.get("ckpt") in (None, "none") else str(Path(part["ckpt"]).resolve())
        if "class_path" in part:
            config = {"class_path": part["class_path"], "init_args": dict(part.get("init_args") or {})}
        elif "config" in part:
            config = read_recipe(part["config"])["model"]["retriever"]
        else:
            config = saved_retriever(ckpt)
        part_overrides = dict(overrides or {})
        if ckpt is not None:  # the checkpoint's weights replace any pretrained ones: no download
            part_overrides["pretrained"] = None
        parts[role] = build_retriever(config, part_overrides, ckpt, seed)
        spec[role] = {**parts[role].config, "ckpt": ckpt}
    return TwoStage(parts["recaller"], parts["reranker"], init_args["k"], spec)


def _weights_dropped(recipe_args: dict[str, Any], init_args: dict[str, Any]) -> bool:
    """True when the overrides drop the recipe's pretrained weights but keep its backbone and
    leave the activation unset: the rebuild must still run the weights' activation."""
    return (init_args.get("pretrained") is None and recipe_args.get("pretrained") is not None
            and init_args.get("quick_gelu") is None and "backbone" in recipe_args
            and init_args.get("backbone") == recipe_args["backbone"])


def load_weights(retriever: Retriever, ckpt: str | Path) -> None:
    """Load a ``RetrievalModule`` checkpoint's retriever weights (or a retriever's bare state
    dict) strictly.

    Raises:
        FileNotFoundError: no file at ``ckpt``.
        ValueError: the file is not a checkpoint, holds anything but tensors and plain data
            (see :func:`read_checkpoint`), or its weights do not fit the retriever (names the
            file and the first mismatches).
    """
    path = Path(ckpt)
    payload = read_checkpoint(path)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    if any(key.startswith(RETRIEVER_KEY) for key in state):  # a RetrievalModule's: the retriever's part
        state = {k[len(RETRIEVER_KEY):]: v for k, v in state.items() if k.startswith(RETRIEVER_KEY)}
    try:
        retriever.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not fit {type(retriever).__name__}: {str(error)[:500]}") from None


def read_checkpoint(path: Path) -> Any:
    """A ``torch.save`` file read weights-only: tensors and plain data, never code.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file holds other objects (unpickling them could run code: refused,
            nothing of it is executed), or is not a ``torch.save`` file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's message, less its advice to load the file unsafely
        reason = re.split(r"Please use|Check the documentation", str(error).split("WeightsUnpickler error:")[-1])[0]
        raise ValueError(f"checkpoint {path} refused: it holds more than tensors and plain data, and loading the "
                         f"rest could run code ({' '.join(reason.split()).rstrip('. ')})") from None
    except Exception as error:  # torch raises RuntimeError, KeyError, EOFError... for non-checkpoints
        raise ValueError(f"checkpoint {path} is not a torch.save file ({type(error).__name__}: {error})") from None


def model_fingerprint(retriever: Retriever) -> str:
    """``sha256:<hex>`` over the retriever's ``config`` and every state-dict tensor's name,
    dtype, shape and bytes: equal exactly when two builds compute the same thing.

    Raises:
        TypeError: a hyperparameter is not JSON data.
    """
    digest = hashlib.sha256(json.dumps(retriever.config, sort_keys=True).encode())
    for name, tensor in retriever.state_dict().items():
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def tokenize(retriever: Retriever, captions: Sequence[str]) -> Tensor:
    """open_clip token ids ``[Q, max_words]`` of ``captions`` for ``retriever``'s backbone."""
    tokenizer = open_clip.get_tokenizer(retriever.clip.name, context_length=retriever.max_words)
    return tokenizer(list(captions))
