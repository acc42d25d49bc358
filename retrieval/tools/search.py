"""``vtr search``: rank an index's videos for typed queries.

``vtr search --index index.safetensors "a red square moves left" [-k 5]`` rebuilds the method that
wrote the index (:mod:`retrieval.tools.index`), refuses it unless its fingerprint is the index's,
encodes the query with ``encode_text`` and ranks the stored gallery with ``score_gallery`` +
top-k: the same three stages as training, evaluation and the latency benchmark. ``--faiss``
(fusion-free methods, ``faiss-cpu`` installed) ranks with a flat inner-product FAISS index
instead; the scores are the same logits.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retrieval.features import VideoFeatures
from retrieval.recipes import build_retriever, model_fingerprint, tokenize
from retrieval.retriever import Retriever
from retrieval.tools.index import indexed_checkpoint, load_index, none_or
from retrieval.topk import exact_topk

_FROM_INDEX = "index"


def load_indexed_method(index: dict[str, Any], ckpt: str | None = _FROM_INDEX) -> Retriever:
    """Rebuild the method that wrote ``index`` and check it is the same, weight for weight.

    Args:
        index: a loaded index.
        ckpt: the checkpoint to load; by default the one recorded in the index
            (:func:`indexed_checkpoint`).

    Raises:
        ValueError: the rebuilt method's fingerprint differs from the index's (another
            checkpoint, or any weight changed).
    """
    ckpt = indexed_checkpoint(index) if ckpt == _FROM_INDEX else ckpt
    config = {"class_path": index["class_path"], "init_args": index["init_args"]}
    model = build_retriever(config, ckpt=ckpt, seed=index["seed"])
    expected, got = index["fingerprint"], model_fingerprint(model)
    if got != expected:
        hint = (f"pass its checkpoint ({index['ckpt_absolute']}) with --ckpt" if index["ckpt_absolute"]
                else f"it was built without a checkpoint (seed {index['seed']}): pass --ckpt none")
        raise ValueError(f"the method rebuilt with ckpt={ckpt!r} does not hold the weights that built {index['path']} "
                         f"(fingerprint {got[:19]}... vs {expected[:19]}...); {hint}")
    return model


def search(
    index: dict[str, Any],
    queries: Sequence[str],
    k: int = 5,
    model: Retriever | None = None,
    use_faiss: bool = False,
    device: str = "cpu",
) -> list[list[tuple[str, float]]]:
    """Rank the indexed videos for each query.

    Args:
        index: a loaded index.
        queries: free-text queries.
        k: results per query (clamped at the gallery size).
        model: the indexed method (default: :func:`load_indexed_method`).
        use_faiss: rank with a FAISS flat inner-product index (fusion-free methods only).
        device: where to score.

    Returns:
        Per query, ``k`` pairs ``(video_id, score)`` best first; scores are ``score`` logits. A
        fusion-free method is searched by :func:`retrieval.topk.exact_topk` (its logits are the
        logit scale times the embeddings' product), any other by ``score_gallery`` and a top-k.
    """
    model = (model or load_indexed_method(index)).to(device).eval()
    gallery = VideoFeatures(**index["features"]).to(device)
    k = min(k, len(gallery))
    with torch.inference_mode():
        text = model.encode_text(tokenize(model, queries).to(device))
        if use_faiss:
            scores, ids = _faiss_topk(model, text.embedding, gallery, k)
        elif model.fusion_free:  # one product: the exact search that reads the gallery once
            values, ids = exact_topk(text.embedding.float(), gallery.embedding.float(), None, k)
            scores = model.logit_scale().float() * values
        else:
            scores, ids = model.score_gallery(text, gallery).topk(k, dim=1)
    names = index["video_ids"]
    return [[(names[i], float(s)) for s, i in zip(row_s.tolist(), row_i.tolist())] for row_s, row_i in zip(scores, ids)]


def _faiss_topk(model: Retriever, queries: torch.Tensor, gallery: VideoFeatures,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by a FAISS ``IndexFlatIP`` over the fusion-free embeddings, scaled to logits."""
    if not model.fusion_free:
        raise ValueError(f"--faiss needs a fusion-free method; {type(model).__name__} is text-conditioned")
    try:
        import faiss
    except ImportError:
        raise ImportError("--faiss needs faiss: pip install faiss-cpu") from None
    embedding = gallery.embedding.float().cpu().numpy()
    flat = faiss.IndexFlatIP(embedding.shape[1])
    flat.add(embedding)
    scores, ids = flat.search(queries.float().cpu().numpy(), k)
    return model.logit_scale().float().cpu() * torch.from_numpy(scores), torch.from_numpy(ids).long()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtr search", description="Rank indexed videos for text queries.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("query", nargs="+", help="one or more queries")
    parser.add_argument("--index", required=True, type=Path)
    parser.add_argument("--ckpt", default=_FROM_INDEX, help="checkpoint (default: the one that built the index)")
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--faiss", action="store_true", help="FAISS flat inner product (fusion-free methods)")
    parser.add_argument("--device", default="cpu")
    return parser


def main(argv: Sequence[str]) -> None:
    """``vtr search ...`` (``argv[0]`` is the tool name)."""
    args = build_parser().parse_args(list(argv[1:]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        index = load_index(args.index)
        model = load_indexed_method(index, args.ckpt if args.ckpt == _FROM_INDEX else none_or(args.ckpt))
        results = search(index, args.query, args.k, model, args.faiss, args.device)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise SystemExit(f"vtr search: {error}") from None
    for query, hits in zip(args.query, results):
        print(f"{query!r} ({index['class_path'].rsplit('.', 1)[-1]}, {len(index['video_ids'])} videos)")
        for rank, (video_id, score) in enumerate(hits, 1):
            print(f"  {rank:>3}  {video_id:<24} {score:9.4f}")
