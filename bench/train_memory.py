"""Estimated GPU memory of one AMP training step of a full profile, measured on CPU (prints figures; not a test).

    .venv/bin/python bench/train_memory.py --model effdet|classifier [--batch 1] [--imgsz N]

Runs one fp32 forward of the profile's network at its image size with
``torch.autograd.graph.saved_tensors_hooks`` counting the bytes autograd keeps for backward
(each storage once). Under CUDA AMP those activations are fp16, so the estimate is

    weights + grads (fp32) + AdamW moments (2 x fp32) + EMA (fp32) + activations / 2

plus the CUDA context and allocator slack (about 1-2 GB), which it does not count. Use it to pick
``batch`` / ``accumulate`` for a 16 GB card when no GPU is at hand; ``bench/gpu_check.sh`` measures
the real peak on one.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import models
from cxr.config import load


def saved_bytes(forward) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["effdet", "classifier"], required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--imgsz", type=int, default=0, help="default: the full profile's")
    a = p.parse_args()
    overrides = {"weights": None, "backbone_init": None} if a.model == "effdet" else {"weights": None, "pretrained": None}
    if a.imgsz:
        overrides["imgsz"] = a.imgsz
    adapter = models.adapter(a.model)
    cfg = load(adapter.Config, Path("models") / a.model / "full.yaml", overrides)
    s, b = cfg.imgsz, a.batch
    x = torch.rand(b, 3, s, s)
    if a.model == "effdet":
        net = adapter.build(cfg).train()
        target = {"bbox": [torch.tensor([[0.2 * s, 0.2 * s, 0.5 * s, 0.6 * s]])] * b, "cls": [torch.tensor([1.0])] * b}
        forward = lambda: net(x, target)["loss"]  # noqa: E731
    else:
        net = adapter.build(cfg).train()
        forward = lambda: net(x).mean()  # noqa: E731
    start = time.perf_counter()
    act = saved_bytes(forward)
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in net.parameters())
    states = n_params * 4 * 5  # weights, grads, 2 AdamW moments, EMA (fp32)
    gib = 2**30
    print(f"{a.model} full profile at {s}px, micro-batch {b}: {n_params / 1e6:.1f} M parameters, "
          f"saved activations fp32 {act / gib:.2f} GiB (fp16 ~{act / 2 / gib:.2f} GiB), "
          f"weights+grads+AdamW+EMA {states / gib:.2f} GiB, forward {seconds:.1f} s on CPU")
    for batch in (1, 2, 4, 8, 16):
        print(f"  batch {batch:2d}: ~{(states + batch * act / b / 2) / gib:5.1f} GiB + CUDA context")


if __name__ == "__main__":
    main()
