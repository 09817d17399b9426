"""The shared model plumbing: squashed-image boxes back to original pixels, flip TTA, WBF of tables, Lite0
weights, validation mAP, checkpoint files, and the training toolkit of the hand-written loops."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import albumentations as A
import numpy as np
import pandas as pd
import pytest
import timm
import torch

from cxr.data import DataFolder
from cxr.io import DataError
from cxr.wbf import flip_boxes, fuse_predictions
from models.common import load_efficientnet_lite0, predict_split, read_state_dict, validation_map
from models.train_utils import (Stepper, cosine_schedule, make_optimizer, microbatches, resume, run_epochs, save_checkpoint,
                                train_loader)

B = ["x_min", "y_min", "x_max", "y_max"]


def test_normalized_boxes_go_back_to_original_pixels(synth_dir):
    data = DataFolder(synth_dir)
    sizes = data.test_sizes.set_index("image_id")
    ids = [i for i in data.test_ids() if sizes.loc[i, "width"] != sizes.loc[i, "height"]][:3]
    seen = []

    def infer(images):
        seen.extend(im.shape for im in images)
        return [(np.array([[0.25, 0.5, 0.75, 1.0]]), np.array([0.8]), np.array([3])) for _ in images]

    preds = predict_split(infer, data, "test", ids, batch_size=2)
    assert seen == [(128, 128)] * 3  # the model sees the squashed square image
    for image_id in ids:
        w, h = sizes.loc[image_id, ["width", "height"]]
        row = preds[(preds["image_id"] == image_id) & (preds["class_id"] == 3)]
        np.testing.assert_allclose(row[B].to_numpy()[0], [0.25 * w, 0.5 * h, 0.75 * w, 1.0 * h])
        normal = preds[(preds["image_id"] == image_id) & (preds["class_id"] == 14)]
        assert normal["score"].tolist() == pytest.approx([0.2])  # 1 - the highest finding score


def test_flip_tta_undoes_the_flip(synth_dir):
    data = DataFolder(synth_dir)
    image_id = data.test_ids()[0]
    w, h = data.test_sizes.set_index("image_id").loc[image_id, ["width", "height"]]
    calls = []

    def infer(images):
        # a detector that finds a bright square where it is: flipped input -> mirrored box
        flipped = len(calls) % 2 == 1
        calls.append(flipped)
        box = [0.6, 0.2, 0.9, 0.4] if flipped else [0.1, 0.2, 0.4, 0.4]
        return [(np.array([box]), np.array([0.9]), np.array([0])) for _ in images]

    preds = predict_split(infer, data, "test", [image_id], tta=True)
    row = preds[preds["class_id"] == 0]
    assert len(row) == 1
    np.testing.assert_allclose(row[B].to_numpy()[0], [0.1 * w, 0.2 * h, 0.4 * w, 0.4 * h], rtol=1e-6)
    assert preds.loc[preds["class_id"] == 14, B].to_numpy().tolist() == [[0, 0, 1, 1]]


def test_fuse_predictions_weights_and_no_finding():
    sizes = pd.DataFrame({"image_id": ["a"], "width": [1000], "height": [2000]})
    cols = ["image_id", "class_id", "score"] + B
    t1 = pd.DataFrame([["a", 2, 0.9, 100, 200, 300, 400], ["a", 14, 0.4, 0, 0, 1, 1]], columns=cols)
    t2 = pd.DataFrame([["a", 2, 0.5, 110, 200, 310, 400]], columns=cols)
    out = fuse_predictions([t1, t2], sizes, weights=[3, 1])
    box = out[out["class_id"] == 2]
    np.testing.assert_allclose(box[B].to_numpy()[0], [(3 * 0.9 * 100 + 0.5 * 110) / 3.2, 200, (3 * 0.9 * 300 + 0.5 * 310) / 3.2, 400])
    assert out.loc[out["class_id"] == 14, "score"].tolist() == pytest.approx([0.4 * 3 / 4])
    assert flip_boxes(np.array([[10, 1, 30, 2]]), 100).tolist() == [[70, 1, 90, 2]]


def test_efficientnet_lite0_weights_load_offline():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1)
    before = model.conv_stem.weight.detach().clone()
    assert load_efficientnet_lite0(model) == 294  # every tensor but the 2 of the new head
    assert not np.allclose(before.numpy(), model.conv_stem.weight.detach().numpy())
    with pytest.raises(ValueError, match="do not fit"):
        load_efficientnet_lite0(timm.create_model("resnet18", pretrained=False))


# --- the training toolkit (models/train_utils.py) ----------------------------------------------------


def _stepper(accumulate=1, amp=False, ema=0.5, lr=0.1, name="sgd"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    opt = make_optimizer(model.parameters(), name, lr, 0.0)
    sched = cosine_schedule(opt, epochs=2, updates=5, warmup_epochs=0.4)
    return model, Stepper(model, opt, sched, device="cpu", amp=amp, clip_grad=None, accumulate=accumulate, ema_decay=ema)


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x).squeeze(1), y)


def test_schedule_warms_up_linearly_then_decays_to_zero():
    model, st = _stepper()
    lrs = []
    for _ in range(10):  # 2 epochs x 5 updates, warmup 2 updates
        st.step(_loss(model, torch.randn(4, 3), torch.randn(4)), last=True, epoch=0)
        lrs.append(st.lr())
    assert lrs[:2] == pytest.approx([0.05, 0.1])  # update k of a warmup of 2 runs at k/2 of the peak
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))  # then strictly decreasing
    assert lrs[5] == pytest.approx(0.05 * (1 + math.cos(math.pi * 4 / 9)))  # a cosine that would reach 0 at update 11
    assert lrs[-1] == pytest.approx(0.05 * (1 + math.cos(math.pi * 8 / 9))) and 0 < lrs[-1] < 0.004


def test_accumulation_equals_one_big_batch():
    x, y = torch.randn(8, 3), torch.randn(8)
    big, st_big = _stepper(accumulate=1, ema=None)
    small, st_small = _stepper(accumulate=2, ema=None)
    big[1].eval(), small[1].eval()  # BN in eval: the loss of 8 = mean of the two losses of 4
    st_big.step(_loss(big, x, y), last=False, epoch=0)
    st_small.step(_loss(small, x[:4], y[:4]), last=False, epoch=0)
    assert st_small.updates == 0 and st_big.updates == 1
    st_small.step(_loss(small, x[4:], y[4:]), last=False, epoch=0)
    assert st_small.updates == 1
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b)
    # an epoch's last partial group still updates
    st_small.step(_loss(small, x[:4], y[:4]), last=True, epoch=0)
    assert st_small.updates == 2


def test_non_finite_loss_stops_with_a_message():
    model, st = _stepper()
    with pytest.raises(FloatingPointError, match="non-finite loss .* epoch 3"):
        st.step(torch.tensor(float("nan"), requires_grad=True), last=True, epoch=2)


def test_resume_restores_model_ema_optimizer_schedule_and_scaler(tmp_path):
    x, y = torch.randn(8, 3), torch.randn(8)
    model, st = _stepper(amp=True, name="adamw", lr=0.01)  # GradScaler works on CPU too
    for _ in range(3):
        with st.autocast():
            loss = _loss(model, x, y)
        st.step(loss.float(), last=True, epoch=0)
    st.scaler.update(new_scale=1024.0)  # a scale that differs from a fresh scaler's
    save_checkpoint(tmp_path / "last.pt", model, st, epoch=0, best=0.5, log=[{"epoch": 1}])

    fresh, st2 = _stepper(amp=True, name="adamw", lr=0.01)
    assert resume(tmp_path / "missing.pt", fresh, st2, "cpu") == (0, -math.inf, [], 0)
    assert resume(tmp_path / "last.pt", fresh, st2, "cpu") == (1, 0.5, [{"epoch": 1}], 0)
    assert st2.updates == 3 and st2.scaler.get_scale() == 1024.0
    assert st2.sched.state_dict() == st.sched.state_dict()
    for a, b in zip(st.ema.module.state_dict().values(), st2.ema.module.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert st2.opt.state_dict()["state"][0]["exp_avg"].abs().sum() > 0
    # the next update is the same on both: weights, moments, learning rate and loss scale all came back
    for m, s in ((model, st), (fresh, st2)):
        with s.autocast():
            loss = _loss(m, x, y)
        s.step(loss.float(), last=True, epoch=1)
    assert st2.lr() == st.lr() > 0
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b)


class _Points(torch.utils.data.Dataset):
    """24 fixed (x, y) pairs with the albumentations ``transform`` the training loader seeds."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y, self.transform = torch.randn(24, 3, generator=g), torch.randn(24, generator=g), A.Compose([])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class _Stop(Exception):
    pass


def _train(out: Path, stop_at: tuple[int, int] | None = None) -> list[int]:
    """3 epochs of 6 micro-batches (accumulate 2, EMA) through run_epochs with a checkpoint at every update
    boundary (checkpoint_minutes ~ 0); ``stop_at=(epoch, step)``: raise after that micro-batch, as a kill would.
    Returns the samples trained on, in order."""
    cfg = argparse.Namespace(epochs=3, batch=4, validate_every=1, checkpoint_minutes=1e-9)
    model, st = _stepper(accumulate=2, ema=0.9)
    st.sched = cosine_schedule(st.opt, epochs=3, updates=3, warmup_epochs=0.5)
    ds = _Points()
    loader = train_loader(ds, cfg.batch, 0, seed=0, dev="cpu")
    seen: list[int] = []

    def epoch_fn(epoch, progress):
        model.train()
        for i, ((x, y), last) in enumerate(microbatches(loader)):
            seen.extend(int((ds.x == row).all(1).nonzero()) for row in x)
            st.step(_loss(model, x, y), last, epoch)
            progress.step(0.0)
            if stop_at == (epoch, i + 1):
                raise _Stop
        return 0.0

    run_epochs(cfg, out, "val_map", loader, model, st, epoch_fn, lambda m: (0.0, 0.0), resume(out / "last.pt", model, st, "cpu"))
    return seen


def test_a_job_killed_mid_epoch_resumes_to_the_weights_of_one_never_stopped(tmp_path, capsys):
    """checkpoint_minutes: last.pt within an epoch, only between optimizer updates (accumulate 2); a run
    stopped in epoch 2 after micro-batch 3 resumes after micro-batch 2 (the last update), does the rest of
    that epoch in the same order, and ends with the same weights and EMA as a run never stopped."""
    whole = _train(tmp_path / "whole")
    with pytest.raises(_Stop):
        _train(tmp_path / "cut", stop_at=(1, 3))
    ckpt = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["step"], ckpt["updates"]) == (0, 2, 4)  # epoch 1 done, 2 micro-batches of epoch 2
    capsys.readouterr()
    rest = _train(tmp_path / "cut")
    assert "resuming in epoch 2 after step 2" in capsys.readouterr().out
    assert rest == whole[6 * 4 + 2 * 4:]  # the same samples in the same order from micro-batch 3 of epoch 2 on
    a, b = (torch.load(tmp_path / run / "weights.pt", weights_only=False)["model"] for run in ("whole", "cut"))
    for key in a:  # the final EMA weights
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert not (tmp_path / "cut" / "last.pt").exists()  # a finished fold keeps no optimizer checkpoint


def test_ema_follows_the_weights():
    model, st = _stepper(ema=0.5)
    w0 = model[0].weight.detach().clone()
    st.step(_loss(model, torch.randn(4, 3), torch.randn(4)), last=True, epoch=0)
    torch.testing.assert_close(st.final_model()[0].weight, model[0].weight)  # update 1 copies (timm: decay 0)
    w1 = model[0].weight.detach().clone()
    st.step(_loss(model, torch.randn(4, 3), torch.randn(4)), last=True, epoch=0)
    torch.testing.assert_close(st.final_model()[0].weight, 0.5 * w1 + 0.5 * model[0].weight)
    assert not torch.equal(w0, w1)


def test_read_state_dict_formats(tmp_path):
    from safetensors.torch import save_file

    state = {"a.weight": torch.randn(2, 3), "b.bias": torch.randn(2)}
    torch.save(state, tmp_path / "plain.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, tmp_path / "timm.pth.tar")
    torch.save({"model": state}, tmp_path / "ours.pt")
    save_file(state, tmp_path / "hf.safetensors")
    for name in ("plain.pth", "timm.pth.tar", "ours.pt", "hf.safetensors"):
        got = read_state_dict(tmp_path / name)
        assert got.keys() == state.keys(), name
        torch.testing.assert_close(got["a.weight"], state["a.weight"])
    torch.save({"args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")  # needs unpickling code
    with pytest.raises(DataError, match="not a state dict"):
        read_state_dict(tmp_path / "pickled.pth")


def test_validation_map_scores_a_perfect_and_an_empty_detector(synth_dir):
    """The shared validation number: the labels' own boxes score 1, a detector that finds nothing 0."""
    data = DataFolder(synth_dir)
    fused = data.fused()
    ids = fused.loc[fused["class_id"] != 14, "image_id"].unique()[:6].tolist()
    wh = data.train_sizes.set_index("image_id")[["width", "height"]]
    queue = list(ids)

    def perfect(images):
        out = []
        for _ in images:
            g = fused[(fused["image_id"] == queue.pop(0)) & (fused["class_id"] != 14)]
            w, h = wh.loc[g["image_id"].iloc[0]]
            out.append((g[B].to_numpy() / [w, h, w, h], np.ones(len(g)), g["class_id"].to_numpy()))
        return out

    assert validation_map(perfect, data, ids, batch_size=4) == pytest.approx(1.0)
    assert validation_map(lambda images: [(np.zeros((0, 4)), np.zeros(0), np.zeros(0))] * len(images), data, ids) == 0.0


def test_resume_refuses_a_checkpoint_of_the_old_loop(tmp_path):
    model, st = _stepper()
    torch.save({"model": model.state_dict(), "opt": st.opt.state_dict(), "epoch": 0, "best": 0.1, "log": []},
               tmp_path / "last.pt")
    with pytest.raises(DataError, match="older version"):
        resume(tmp_path / "last.pt", model, st, "cpu")


# --- devices, multi-GPU rule, decoding in workers (models/common.py) ----------------------------------


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA as a machine with cards of the given capabilities would report it (no GPU needed)."""
    from models import common

    def install(*caps: tuple[int, int], archs=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")):
        common.cuda_problem.cache_clear()
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(caps))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: caps[i])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: f"card{i}")
        monkeypatch.setattr(common, "_driver", lambda: "580.65" if caps else None)

    yield install
    common.cuda_problem.cache_clear()


def test_full_profiles_need_a_usable_gpu_demo_profiles_run_anywhere(fake_cuda, capsys):
    from models.common import device

    fake_cuda()  # no card, no driver
    assert device("auto") == "cpu" and device("cpu") == "cpu"
    with pytest.raises(DataError, match=r"needs a GPU \(device: cuda\) and no NVIDIA driver or GPU was found .*"
                                        r"on purpose: DEVICE=cpu"):
        device("cuda")
    fake_cuda((9, 0), (8, 9))  # H100 + L4: both run this torch's kernels
    assert device("cuda") == "cuda" and device("auto") == "cuda"
    fake_cuda((7, 0))  # V100: the CUDA 13 build has no kernels for it
    with pytest.raises(DataError, match=r"GPU 0 \(card0, sm_70\) is older than this torch build supports "
                                        r"\(sm_75..sm_120\): install the CUDA 12.6 build, pip install torch==.* "
                                        r"--index-url https://download.pytorch.org/whl/cu126"):
        device("cuda")
    assert device("auto") == "cpu" and "running on the CPU: GPU 0 (card0, sm_70)" in capsys.readouterr().out
    fake_cuda((7, 0), archs=("sm_75", "compute_70"))  # PTX for 7.0 would JIT
    assert device("cuda") == "cuda"


def test_more_gpus_than_visible_is_one_line(fake_cuda, monkeypatch):
    from models.common import check_gpus

    fake_cuda((9, 0), (9, 0))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    check_gpus(2, "cuda")
    with pytest.raises(DataError, match=r"gpus: 8 GPUs asked for, 2 visible \(CUDA_VISIBLE_DEVICES=2,3\)"):
        check_gpus(8, "cuda")
    check_gpus(2, "cpu")  # gloo processes on the CPU (tests)


def test_multi_gpu_rule_keeps_the_nominal_batch_then_scales_lr():
    from models.common import scale_for_gpus

    assert scale_for_gpus(8, 1) == (8, 1.0)  # one GPU: the profile as written
    assert scale_for_gpus(8, 2) == (4, 1.0)  # accumulating less absorbs the GPUs: same nominal batch and lr
    assert scale_for_gpus(4, 8) == (1, 2.0)  # 8 GPUs x 1 = twice the nominal 4: lr x 2
    assert scale_for_gpus(1, 4) == (1, 4.0)  # detectron2 (no accumulation): the linear scaling rule


def test_loader_workers_follow_the_jobs_cores(monkeypatch):
    from models import common

    monkeypatch.setattr(common, "cpu_count", lambda: 16)
    assert common.loader_workers(8) == 8 and common.loader_workers(8, processes=8) == 2
    assert common.loader_workers(0) == 0
    monkeypatch.setattr(common, "cpu_count", lambda: 2)
    assert common.loader_workers(8) == 2 and common.loader_workers(8, processes=4) == 1
    assert common.decode_workers(8, "cpu") == 0 and common.decode_workers(8, "cuda:0") == 2


def test_prediction_decodes_in_loader_workers_with_the_same_result(synth_dir):
    data = DataFolder(synth_dir)
    ids = data.test_ids()[:10]

    def infer(images):  # a detector whose box depends on the pixels it was given
        return [(np.array([[0.1, 0.1, 0.5, 0.5 + im.mean() / 1000]]), np.array([0.9]), np.array([2])) for im in images]

    here = predict_split(infer, data, "test", ids, batch_size=4)
    workers = predict_split(infer, data, "test", ids, batch_size=4, workers=2)
    pd.testing.assert_frame_equal(here, workers)


def test_device_line_names_card_memory_and_versions(fake_cuda, monkeypatch):
    from types import SimpleNamespace

    from models.common import device_line

    fake_cuda((9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="NVIDIA H200", major=9, minor=0, total_memory=140 * 2**30))
    line = device_line("cuda", 1)
    assert line.startswith("device: 1 x NVIDIA H200 (sm_90, 140.0 GiB); torch ") and "CUDA 13.0" in line
    assert line.endswith("driver 580.65")
    assert device_line("cpu").startswith("device: CPU, ")


def test_a_job_on_fewer_gpus_than_visible_says_so(fake_cuda, monkeypatch, capsys):
    from types import SimpleNamespace

    from models.common import job_device

    fake_cuda((9, 0), (9, 0), (9, 0), (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(name="NVIDIA H100", major=9, minor=0, total_memory=80 * 2**30))
    assert job_device(SimpleNamespace(device="cuda", gpus=1)) == "cuda"
    out = capsys.readouterr().out
    assert out.startswith("device: 1 x NVIDIA H100") and "note: 4 GPUs visible, this job trains on 1" in out
    job_device(SimpleNamespace(device="cuda", gpus=4))
    assert "note" not in capsys.readouterr().out


@pytest.mark.parametrize("tta", [["hflip"], ["0.5"], ["2"], ["0.75+hflip"], ["hflip", "0.5", "1.5+hflip"]])
def test_every_tta_view_maps_a_box_back_exactly(synth_dir, tmp_path, tta):
    """A detector that finds the one bright rectangle of the image it is given, at the input side each view
    asks: every view (mirrored, smaller, larger) gives the rectangle back in original pixels, to a network
    pixel, so the fused table has the one box where it is."""
    import shutil

    import cv2

    from models.common import tta_views, view_size

    data = DataFolder(shutil.copytree(synth_dir, tmp_path / "data"))  # one of its images is redrawn below
    image_id = data.test_ids()[0]
    w, h = data.test_sizes.set_index("image_id").loc[image_id, ["width", "height"]]
    truth = np.array([0.125, 0.25, 0.5, 0.625])  # on a 64-px grid: exact at every size used here
    sizes = []

    def infer(images, size=None):
        size = size or 64
        sizes.append(size)
        out = []
        for image in images:
            bright = cv2.resize(image, (size, size), interpolation=cv2.INTER_NEAREST) > 200
            ys, xs = np.nonzero(bright)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / size
            out.append((box[None], np.array([0.9]), np.array([4])))
        return out

    picture = np.zeros((256, 256), np.uint8)
    x0, y0, x1, y1 = (truth * 256).astype(int)
    picture[y0:y1, x0:x1] = 255
    cv2.imwrite(str(data.image("test", image_id)), picture)
    logged = []
    table = predict_split(infer, data, "test", [image_id], tta=tta, imgsz=64, stride=32, log=logged.append)
    views = tta_views(tta)
    assert sorted(set(sizes)) == sorted({64 if s == 1 else view_size(64, s, 32) for s, _ in views})
    assert len(sizes) == len(views) and len(logged) == 1 and f"{len(views)} views of 1 images" in logged[0], logged
    row = table[table["class_id"] == 4]
    assert len(row) == 1, table
    np.testing.assert_allclose(row[B].to_numpy()[0], truth * [w, h, w, h], rtol=1e-6)


def test_tta_names_only_views():
    from cxr.io import DataError
    from models.common import tta_views

    assert tta_views(False) == [(1.0, False)] and tta_views(True) == [(1.0, False), (1.0, True)]
    assert tta_views(["hflip", "0.83", "0.83+hflip", "1"]) == [(1.0, False), (1.0, True), (0.83, False), (0.83, True)]
    for bad in (["vflip"], ["5"], ["0.1"], ["nan"], ["hflip+hflip"]):
        with pytest.raises(DataError, match="is not a view"):
            tta_views(bad)
