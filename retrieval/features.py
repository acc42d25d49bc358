"""Containers for what ``encode_video`` and ``encode_text`` return.

A method stores the tensors its ``score`` needs, all with the same leading dimension (videos
for :class:`VideoFeatures`, queries for :class:`TextFeatures`). Because every field shares that
leading dimension, the framework can slice a gallery into chunks, concatenate batches, gather
across ranks and tile galleries without knowing the method.

A field name means one thing in every method (D: the joint embedding width, T frames, L tokens):

============  =====  ==========  =================================================================
field         side   shape       meaning
============  =====  ==========  =================================================================
embedding     both   [n, D']     one text-independent vector per video / per query, the vectors a
                                 fusion-free score takes the dot product of (``Retriever.score``:
                                 ``σ ⟨text.embedding, video.embedding⟩``). Unit-norm, except
                                 CLIP2Video's ``[√w glob, √(1-w) tab]`` mix (D' = 2D). X-CLIP's
                                 video-level feature v̂ (text-conditioned, but a vector per video).
frames        video  [N, T, D]   per-frame features of the video (their normalisation: the method's
                                 docstring)
frame_mask    video  [N, T]      bool, True for real frames, False for padding
sentence      text   [Q, D]      the unit-norm EOT (sentence) feature ŝ of a text-conditioned method
eot           text   [Q, D]      the raw, un-normalised EOT feature s (tightTransf's cross input)
words         text   [Q, L, D]   per-token features (normalisation: the method's docstring)
word_mask     text   [Q, L]      bool, True for tokens that are not padding
============  =====  ==========  =================================================================

Any other field is a method's own cache, named and documented in its file (X-CLIP's
``sentence_global`` and ``frame_operand``, GLCCL's ``gram``, X-Pool's ``frame_keys`` /
``frame_values`` and the ``frame_g`` / ``frame_forms`` that ``prepare_gallery`` leaves).
Two-stage retrieval prefixes each part's fields with ``recall.`` / ``rerank.``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound="Features")


class Features(Mapping[str, Tensor]):
    """An immutable bundle of tensors that share their leading dimension.

    Fields are read as attributes (``video.embedding``) or by key (``video["embedding"]``).
    Indexing with an int, slice or index tensor selects along the leading dimension.
    """

    __slots__ = ("_tensors",)

    def __init__(self, **tensors: Tensor) -> None:
        if not tensors:
            raise ValueError(f"{type(self).__name__} needs at least one tensor")
        shadowing = [name for name in tensors if hasattr(type(self), name) or name.startswith("_")]
        if shadowing:
            raise ValueError(f"{type(self).__name__} field names {shadowing} clash with its methods; rename them")
        sizes = {name: t.shape[0] if t.dim() else None for name, t in tensors.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(f"{type(self).__name__} fields must share a leading dimension, got {sizes}")
        object.__setattr__(self, "_tensors", dict(tensors))

    def __reduce__(self):
        return _rebuild, (type(self), self._tensors)

    def __getattr__(self, name: str) -> Tensor:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._tensors[name]
        except KeyError:
            raise AttributeError(
                f"{type(self).__name__} has no field {name!r}; it has {sorted(self._tensors)}"
            ) from None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; build a new one with replace()")

    def __getitem__(self: F, key: str | int | slice | Tensor) -> Tensor | F:  # type: ignore[override]
        if isinstance(key, str):
            return self._tensors[key]
        if isinstance(key, int):
            key = slice(key, key + 1)
        return type(self)(**{name: t[key] for name, t in self._tensors.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return next(iter(self._tensors.values())).shape[0]

    @property
    def device(self) -> torch.device:
        """Where its tensors are (its first field's device)."""
        return next(iter(self._tensors.values())).device

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._tensors.items())
        return f"{type(self).__name__}({fields})"

    def map(self: F, fn: Callable[[Tensor], Tensor]) -> F:
        """Apply ``fn`` to every tensor (e.g. ``.map(lambda t: t.to(device))``)."""
        return type(self)(**{name: fn(t) for name, t in self._tensors.items()})

    def to(self: F, *args, **kwargs) -> F:
        """``Tensor.to`` on every field; floating dtypes only change floating fields."""
        dtype = kwargs.pop("dtype", None)
        out = self.map(lambda t: t.to(*args, **kwargs))
        if dtype is None:
            return out
        return out.map(lambda t: t.to(dtype) if t.is_floating_point() else t)

    def replace(self: F, **tensors: Tensor) -> F:
        """A copy with some fields replaced or added."""
        return type(self)(**{**self._tensors, **tensors})

    def chunks(self: F, size: int) -> Iterator[tuple[int, F]]:
        """Yield ``(start, features[start:start + size])`` over the leading dimension."""
        for start in range(0, len(self), size):
            yield start, self[start : start + size]

    @classmethod
    def cat(cls: type[F], parts: Sequence[F]) -> F:
        """Concatenate along the leading dimension; all parts must have the same fields."""
        if not parts:
            raise ValueError(f"{cls.__name__}.cat needs at least one part")
        names = list(parts[0])
        for part in parts[1:]:
            if list(part) != names:
                raise ValueError(f"{cls.__name__}.cat: fields differ: {names} vs {list(part)}")
        return cls(**{name: torch.cat([p[name] for p in parts]) for name in names})

    def repeat_to(self: F, n: int) -> F:
        """Tile the rows cyclically up to ``n`` rows (benchmark galleries built from real features)."""
        index = torch.arange(n, device=self.device) % len(self)
        return self[index]

    def nbytes(self) -> int:
        """Bytes held by all fields."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def as_dict(self) -> dict[str, Tensor]:
        """The fields as a plain dict (for ``LightningModule.all_gather`` and checkpoints)."""
        return dict(self._tensors)


def _rebuild(cls: type[F], tensors: dict[str, Tensor]) -> F:
    return cls(**tensors)


class VideoFeatures(Features):
    """What ``encode_video`` returns: text-independent, computed once per video (offline)."""


class TextFeatures(Features):
    """What ``encode_text`` returns: computed once per query."""
