"""CPU DDP (gloo) equals one process: training loss and gradients on two processes, evaluation on two
processes (padding duplicates dropped) and a whole fit on a process group of one."""

import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fakes import FakeVideoText

from baselines.clip4clip import SeqTransf
from retrieval.training import RetrievalModule


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


def _model(module=RetrievalModule):
    torch.manual_seed(0)
    return module(SeqTransf(backbone="vtr-micro", num_frames=4, max_words=16))


def _loss_and_grads(model, frames, mask, tokens):
    model.zero_grad()
    retriever = model.retriever
    terms, _ = model.contrastive_losses(retriever.encode_text(tokens), retriever.encode_video(frames, mask))
    loss = sum(terms.values())
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


class _RecordingModule(RetrievalModule):
    """A RetrievalModule that saves, per rank, how many rows it encoded and what the evaluation gather kept."""

    record_dir: str = ""

    def gather_eval_features(self):
        encoded = (sum(len(i) for i, _ in self._eval_buffers["video"]),
                   sum(len(i) for i, _, _ in self._eval_buffers["text"]))
        text, video, caption_video = super().gather_eval_features()
        torch.save({"encoded": encoded, "caption_video": caption_video, "text": text.as_dict(),
                    "video": video.as_dict()}, f"{self.record_dir}/rank{self.global_rank}.pt")
        return text, video, caption_video


def _recording_model(record_dir):
    model = _model(_RecordingModule)
    model.record_dir = str(record_dir)
    return model


def test_ddp_evaluation_drops_exactly_the_samplers_padding(tmp_path):
    # 7 videos and 13 captions on 2 ranks: DistributedSampler pads each set with one duplicate
    # (4 + 4 videos, 7 + 7 captions), which the gather must drop, keeping dataset order
    dm = FakeVideoText(num_videos=7, num_frames=4, size=32, max_words=16, batch_size=2, seed=2)
    assert len(dm.tokens) == 13
    kwargs = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path)
    (tmp_path / "single").mkdir()
    (tmp_path / "ddp").mkdir()
    single = L.Trainer(devices=1, **kwargs).test(_recording_model(tmp_path / "single"), dm, verbose=False)[0]
    ddp = L.Trainer(devices=2, strategy="ddp_spawn", **kwargs).test(_recording_model(tmp_path / "ddp"), dm,
                                                                     verbose=False)[0]
    one = torch.load(tmp_path / "single" / "rank0.pt")
    ranks = [torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1)]
    assert one["encoded"] == (7, 13)
    assert [r["encoded"] for r in ranks] == [(4, 7), (4, 7)]
    for r in ranks:
        assert torch.equal(r["caption_video"], dm.caption_video)
        for side in ("text", "video"):
            assert r[side].keys() == one[side].keys()
            for name, value in one[side].items():
                assert r[side][name].shape == value.shape  # 7 videos, 13 captions: no duplicate left
                torch.testing.assert_close(r[side][name], value, rtol=1e-5, atol=1e-5)
    assert ddp == pytest.approx(single, abs=1e-4)


def test_ddp_on_one_device_fits_validates_and_tests_like_one_process(tmp_path, monkeypatch):
    # a 1-GPU node with experiments/trainer/ddp.yaml: a process group of one, where all_gather
    # still prepends the world dimension. (DDP's sampler shuffles the training data, so the
    # fitted weights are compared by evaluating them again without DDP.)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dm = FakeVideoText(num_videos=7, num_frames=4, size=32, max_words=16, batch_size=2, seed=2)
    kwargs = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0, default_root_dir=tmp_path)
    model = _model()
    try:
        trainer = L.Trainer(strategy="ddp", **kwargs)
        trainer.fit(model, dm)
        assert dist.is_initialized() and dist.get_world_size() == 1
        fitted = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        ddp = (trainer.validate(model, dm, verbose=False)[0], trainer.test(model, dm, verbose=False)[0])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    plain = L.Trainer(**kwargs)
    single = (plain.validate(model, dm, verbose=False)[0], plain.test(model, dm, verbose=False)[0])
    assert len(fitted) == len(single[0]) == 11 + 12  # R@1/5/10 (each with its interval), MdR, MnR both ways, val/t2v_R1
    assert fitted == pytest.approx(single[0], abs=1e-4)
    assert len(ddp) == len(single)  # (validate, test): pytest >= 9.2's approx compares flat mappings only
    for got, expected in zip(ddp, single):
        assert got == pytest.approx(expected, abs=1e-4)
