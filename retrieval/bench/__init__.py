"""vtr's tools around a trained (or freshly built) method: latency, the offline index, sweeps.

- :mod:`retrieval.bench.latency`: ``vtr bench latency`` (offline encode throughput and online
  per-query latency against gallery size, beside the scorer's compute and bandwidth floors),
  timed by :mod:`retrieval.bench.timing` with the meters of :mod:`retrieval.bench.meters`;
- :mod:`retrieval.bench.metrics_time`: ``vtr bench metrics`` (the metric suite's own cost);
- :mod:`retrieval.bench.index`: ``vtr index`` (encode a split's videos once) and
  ``vtr search`` (rank them for a typed query);
- :mod:`retrieval.bench.sweep`: ``vtr sweep`` (a local grid of ``vtr fit`` runs);
- :mod:`retrieval.bench.results`: where result files go, their names, merging and plots.

Methods are data, not code: every tool builds a method from its recipe YAML's ``model``
section (``class_path`` + ``init_args``, the same file ``vtr fit --config`` reads), so this
package never imports ``baselines``. The helpers below are the one way the tools do that.

Opening a file runs no code: checkpoints are read with ``torch.load(weights_only=True)``
(tensors and plain data only; a Lightning checkpoint of this project is plain data: its
hyperparameters are saved as dicts), and indexes are safetensors files.
"""

from __future__ import annotations

import copy
import dataclasses
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
from jsonargparse import ArgumentParser
from torch import Tensor

from retrieval.backbone import weights_quick_gelu
from retrieval.data.datamodule import MODEL_SETTINGS
from retrieval.module import RetrievalModule

log = logging.getLogger(__name__)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe YAML (``experiments/model/<name>.yaml``) as a dict with a ``model`` section.

    A variant (``experiments/ablations/``) names its recipe with ``base:`` (a path relative to
    the variant) and holds only what it changes; mappings are merged key by key onto the base,
    so the variant follows every later edit of its recipe.

    The ``data`` section comes back as ``vtr fit`` links it: ``num_frames`` and ``max_words``
    (and ``eval_num_frames`` for a method that fixes it) are the model's ``init_args``. The
    backbone is not copied: every tool sets the data's from the model it builds.

    Raises:
        FileNotFoundError: no file at ``path`` (or at a ``base`` it names).
        ValueError: the file has no ``model: {class_path, init_args}`` section, its bases
            form a cycle, or its ``data`` section contradicts a setting linked from the model.
    """
    recipe = _read_with_bases(Path(path), ())
    model = recipe.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{path} has no 'model: {{class_path: ..., init_args: ...}}' section")
    init_args, data = model.get("init_args") or {}, dict(recipe.get("data") or {})
    for key in (*MODEL_SETTINGS, "eval_num_frames"):
        if key not in init_args:
            continue
        if key in data and data[key] != init_args[key]:
            raise ValueError(f"{path}: data.{key}={data[key]!r} contradicts model.init_args.{key}={init_args[key]!r}; "
                             f"data.{key} is the model's: set model.init_args.{key} only")
        if key != "backbone":
            data[key] = init_args[key]
    return {**recipe, "data": data} if data else recipe


def _read_with_bases(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist" + (f" (the base of {seen[-1]})" if seen else ""))
    if path.resolve() in seen:
        raise ValueError(f"recipe bases form a cycle: {' -> '.join(map(str, seen + (path.resolve(),)))}")
    recipe = yaml.safe_load(path.read_text()) or {}
    base = recipe.pop("base", None)
    if base is None:
        return recipe
    return _merged(_read_with_bases(path.parent / base, seen + (path.resolve(),)), recipe)


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied, mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def context_length(backbone: str) -> int:
    """The text context of an open_clip model config (``vtr-tiny``: 32, CLIP: 77)."""
    config = open_clip.get_model_config(backbone)
    if config is None:
        raise ValueError(f"unknown backbone {backbone!r}: no open_clip model config of that name")
    return config["text_cfg"].get("context_length", 77)


def build_method(
    model_config: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    ckpt: str | Path | None = None,
    seed: int = 0,
) -> RetrievalModule:
    """Instantiate a method from a recipe's ``model`` section, as ``vtr fit`` would.

    Args:
        model_config: ``{class_path, init_args}``.
        overrides: ``init_args`` to replace, e.g. ``{"backbone": "vtr-tiny", "pretrained": None}``
            to run a ViT-B/32 recipe on the tiny backbone. When the backbone changes and the
            recipe's ``max_words`` exceeds the new backbone's context, ``max_words`` is lowered
            to that context (logged).
        ckpt: a Lightning checkpoint (or a plain state dict) whose weights are loaded strictly.
        seed: seeds the random initialisation, so two builds without ``ckpt`` are identical.

    Returns:
        The method in eval mode on the CPU.
    """
    if model_config.get("class_path") == TWO_STAGE:
        return build_two_stage(model_config.get("init_args") or {}, overrides, seed)
    config = copy.deepcopy(model_config)
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
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(RetrievalModule, "model", required=True)
    parsed = parser.parse_object({"model": config})
    L.seed_everything(seed, verbose=False)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    model = instantiate(parsed).model
    if ckpt is not None:
        load_weights(model, ckpt)
    return model.eval()


TWO_STAGE = "retrieval.two_stage.TwoStage"


def build_two_stage(init_args: dict[str, Any], overrides: dict[str, Any] | None = None, seed: int = 0):
    """A :class:`~retrieval.two_stage.TwoStage` from ``{recaller, reranker, k}``.

    Each part is ``{config: RECIPE.yaml, ckpt: CKPT}`` (the method's recipe, rebuilt with the
    hyperparameters saved in the checkpoint, then its weights) or ``{class_path, init_args, ckpt}``
    (what :func:`model_config` of a built one records). Paths are kept absolute, so an index
    rebuilds the pair from anywhere.

    Raises:
        ValueError: a part or ``k`` is missing or malformed (the message names it).
    """
    from retrieval.two_stage import TwoStage

    if not isinstance(init_args.get("k"), int):
        raise ValueError(f"a two-stage retriever needs an int 'k' in its init_args, got {init_args.get('k')!r}")
    parts, spec = {}, {}
    for role in ("recaller", "reranker"):
        part = init_args.get(role)
        if not isinstance(part, dict) or not ({"config", "class_path"} & set(part)):
            raise ValueError(f"two-stage '{role}' must be {{config: RECIPE.yaml, ckpt: CKPT}} or "
                             f"{{class_path, init_args, ckpt}}, got {part!r}")
        ckpt = None if part.get("ckpt") in (None, "none") else str(Path(part["ckpt"]).resolve())
        if "class_path" in part:
            config = {"class_path": part["class_path"], "init_args": dict(part.get("init_args") or {})}
        else:
            config = read_recipe(part["config"])["model"]
            saved = read_checkpoint(Path(ckpt)).get("hyper_parameters", {}) if ckpt else {}
            config = {**config, "init_args": {**(config.get("init_args") or {}), **saved}}
        part_overrides = dict(overrides or {})
        if ckpt is not None:  # the checkpoint's weights replace any pretrained ones: no download
            part_overrides["pretrained"] = None
        parts[role] = build_method(config, part_overrides, ckpt, seed)
        spec[role] = {**model_config(parts[role]), "ckpt": ckpt}
    return TwoStage(parts["recaller"], parts["reranker"], init_args["k"], spec)


def _weights_dropped(recipe_args: dict[str, Any], init_args: dict[str, Any]) -> bool:
    """True when the overrides drop the recipe's pretrained weights but keep its backbone and
    leave the activation unset: the rebuild must still run the weights' activation."""
    return (init_args.get("pretrained") is None and recipe_args.get("pretrained") is not None
            and init_args.get("quick_gelu") is None and "backbone" in recipe_args
            and init_args.get("backbone") == recipe_args["backbone"])


def load_weights(model: RetrievalModule, ckpt: str | Path) -> None:
    """Load a Lightning checkpoint's ``state_dict`` (or a bare state dict) strictly.

    Raises:
        FileNotFoundError: no file at ``ckpt``.
        ValueError: the file is not a checkpoint, holds anything but tensors and plain data
            (see :func:`read_checkpoint`), or its weights do not fit the model (names the file
            and the first mismatches).
    """
    path = Path(ckpt)
    payload = read_checkpoint(path)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: {str(error)[:500]}") from None


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


def _plain(value: Any) -> Any:
    """Hyperparameters as YAML/JSON-able values (dataclasses such as ``OptimConfig`` become dicts)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def model_config(model: RetrievalModule) -> dict[str, Any]:
    """``{class_path, init_args}`` that rebuilds ``model``'s architecture."""
    cls = type(model)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": _plain(dict(model.hparams))}


def model_fingerprint(model: RetrievalModule) -> str:
    """``sha256:<hex>`` over the method's config (:func:`model_config`) and every state-dict
    tensor's name, dtype, shape and bytes: equal exactly when two builds compute the same thing.

    Raises:
        TypeError: a hyperparameter is not JSON data.
    """
    digest = hashlib.sha256(json.dumps(model_config(model), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + digest.hexdigest()


def tokenize(model: RetrievalModule, captions: Sequence[str]) -> Tensor:
    """open_clip token ids ``[Q, max_words]`` of ``captions`` for ``model``'s backbone."""
    tokenizer = open_clip.get_tokenizer(model.clip.name, context_length=model.max_words)
    return tokenizer(list(captions))
