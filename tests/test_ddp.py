"""Two-process CPU DDP (gloo) equals one process: training loss and gradients, and evaluation."""

import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fakes import FakeVideoText

from baselines.clip4clip import SeqTransf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(n, 4, 3, 32, 32, generator=g)
    mask = torch.ones(n, 4, dtype=torch.bool)
    mask[1, 3] = False
    tokens = torch.zeros(n, 16, dtype=torch.long)
    tokens[:, 0] = 49406
    tokens[:, 1:6] = torch.randint(1, 49000, (n, 5), generator=g)
    tokens[:, 6] = 49407
    return frames, mask, tokens


def _model():
    torch.manual_seed(0)
    return SeqTransf(backbone="vtr-micro", num_frames=4, max_words=16)


def _loss_and_grads(model, frames, mask, tokens):
    model.zero_grad()
    loss = model.contrastive_loss(model.encode_text(tokens), model.encode_video(frames, mask))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank, world_size, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    frames, mask, tokens = _batch()
    part = slice(rank * 3, rank * 3 + 3)
    loss, grads = _loss_and_grads(_model(), frames[part], mask[part], tokens[part])
    dist.all_reduce(loss)
    for g in grads.values():  # what DDP does: average gradients over ranks
        dist.all_reduce(g)
        g /= world_size
    if rank == 0:
        torch.save({"loss": loss / world_size, "grads": grads}, out_path)
    dist.destroy_process_group()


def test_two_process_loss_and_gradients_equal_one_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    loss, grads = _loss_and_grads(_model(), *_batch())
    assert (ddp["loss"] - loss).abs() / loss.abs() <= 1e-6
    assert set(ddp["grads"]) == set(grads)
    num = sum(((ddp["grads"][n] - g) ** 2).sum() for n, g in grads.items()).sqrt()
    den = sum((g**2).sum() for g in grads.values()).sqrt()
    assert num / den <= 1e-6, f"relative gradient error {num / den:.2e}"


@pytest.mark.parametrize("num_videos", [7])
def test_ddp_evaluation_on_an_odd_test_set_equals_one_process(tmp_path, num_videos):
    dm = FakeVideoText(num_videos=num_videos, num_frames=4, size=32, max_words=16, batch_size=2)
    kwargs = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path)
    single = L.Trainer(devices=1, **kwargs).test(_model(), dm, verbose=False)[0]
    ddp = L.Trainer(devices=2, strategy="ddp_spawn", **kwargs).test(_model(), dm, verbose=False)[0]
    assert len(dm.tokens) % 2 == 1 or num_videos % 2 == 1  # the sampler must pad
    assert ddp == pytest.approx(single, abs=1e-4)
