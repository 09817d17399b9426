"""Starting weights: the public checkpoints the ``full`` profiles name, and one way to load them.

Nothing here downloads unless asked: ``make weights`` (``python -m models.weights``) fetches the
files of :data:`WEIGHTS` into ``weights/`` on a machine with internet and checks each against its
published hash. Tests, the demo and CI never call it; they write checkpoint files of their own
in each framework's format.

Every adapter loads a checkpoint the same way: the framework's file is read into a plain
``name -> tensor`` dict (renamed to the model's names where the framework's publisher used
others), then :func:`transfer` copies every tensor whose name and shape fit, leaves the rest as
initialised (class heads: 80 or 90 COCO classes, 1000 ImageNet classes), prints one line::

    loaded 344 of 357 tensors from weights/yolov8x.pt; re-initialised: model.22.cv3.0.2.weight, ...

and stops with a clear error when less than half of the backbone loaded (the file belongs to
another architecture).
"""
from __future__ import annotations

import os
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from cxr.args import Parser
from cxr.io import DataError, atomic_path, sha256

WEIGHTS_DIR = Path("weights")


@dataclass(frozen=True)
class Checkpoint:
    url: str
    sha256: str  # full digest, or the prefix the publisher put in the file name ('' when none is published)
    what: str
    profile: str  # which full profile names it


# The files the full profiles name. Hashes: effdet/timm file names carry the first 8 hex digits of
# the sha256 (torch.hub's convention); ultralytics and the detectron2 zoo publish none, so for
# those `make weights` records the digest it saw in weights/SHA256SUMS and checks it on later runs.
WEIGHTS: dict[str, Checkpoint] = {
    "yolov8x.pt": Checkpoint(
        "https://github.com/ultralytics/assets/releases/download/v8.3.0/yolov8x.pt", "",
        "YOLOv8x, COCO (80 classes), ultralytics format", "models/yolo/full.yaml"),
    "faster_rcnn_R_101_FPN_3x_f6e8b1.pkl": Checkpoint(
        "https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/faster_rcnn_R_101_FPN_3x/137851257/model_final_f6e8b1.pkl",
        "", "Faster R-CNN R101-FPN 3x, COCO (80 classes), detectron2 model zoo, FrozenBN, BGR 0-255",
        "models/detectron/full.yaml"),
    "tf_efficientdet_d4_49-f56376d9.pth": Checkpoint(
        "https://github.com/rwightman/efficientdet-pytorch/releases/download/v0.1/tf_efficientdet_d4_49-f56376d9.pth",
        "f56376d9", "EfficientDet-D4, COCO (90 classes), effdet state dict", "models/effdet/full.yaml"),
    "tf_efficientnet_b5_ns-6f26d0cf.pth": Checkpoint(
        "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/tf_efficientnet_b5_ns-6f26d0cf.pth",
        "6f26d0cf", "EfficientNet-B5 Noisy Student, ImageNet (1000 classes), timm state dict",
        "models/classifier/full.yaml"),
}


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint file a profile names; a missing file is one clear error saying what to do."""
    p = Path(path)
    if p.is_file():
        return p
    known = WEIGHTS.get(p.name)
    where = f"`make weights` downloads it ({known.url})" if known else "download it from its publisher"
    raise DataError(p, f"checkpoint not found: {where}, or train from scratch with --set weights=null "
                       f"(make ... SET=\"weights=null\")")


def transfer(
    model: torch.nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | os.PathLike,
    is_backbone: Callable[[str], bool],
    log: Callable[[str], None] = print,
) -> tuple[int, int, list[str]]:
    """Copy every tensor of ``state`` whose name and shape fit ``model``; the rest keep their init.

    ``is_backbone(name)`` says which of the model's tensors form the backbone: when fewer than
    half of those load, the file is for another architecture and a :class:`DataError` says so.
    Returns (loaded, total, re-initialised names) and logs the one-line summary.
    """
    target = model.state_dict()
    fits = {k: v for k, v in state.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    reinit = [k for k in target if k not in fits]
    backbone = [k for k in target if is_backbone(k)]
    loaded_backbone = sum(k in fits for k in backbone)
    if not backbone or loaded_backbone * 2 < len(backbone):
        wrong = [k for k in state if k not in target][:3]
        raise DataError(source, f"only {loaded_backbone} of {len(backbone)} backbone tensors fit {type(model).__name__} "
                                f"(e.g. the file has {wrong}): a checkpoint of another architecture?")
    model.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in fits.items()}})
    shown = ", ".join(reinit[:6]) + (f", ... ({len(reinit) - 6} more)" if len(reinit) > 6 else "")
    log(f"loaded {len(fits)} of {len(target)} tensors from {source}; re-initialised: {shown or 'none'}")
    return len(fits), len(target), reinit


def fetch(names: list[str], out: Path = WEIGHTS_DIR) -> list[str]:
    """Download ``names`` into ``out`` (skipping files already there and checked); returns problems."""
    out.mkdir(parents=True, exist_ok=True)
    sums_path = out / "SHA256SUMS"
    sums = dict(line.split()[::-1] for line in sums_path.read_text().splitlines() if line.strip()) if sums_path.exists() else {}
    problems = []
    for name in names:
        ck, dest = WEIGHTS[name], out / name
        if not dest.exists():
            print(f"downloading {ck.url} -> {dest}", flush=True)
            with atomic_path(dest) as tmp:
                urllib.request.urlretrieve(ck.url, tmp)
        digest = sha256(dest)
        expected = ck.sha256 or sums.get(name, "")
        if expected and not digest.startswith(expected):
            problems.append(f"{dest}: sha256 {digest} does not match the published {expected}: delete it and retry")
            continue
        sums[name] = digest
        print(f"{dest}: sha256 {digest} ok{'' if expected else ' (no published hash: recorded in ' + str(sums_path) + ')'}")
    with atomic_path(sums_path) as tmp:
        tmp.write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    return problems


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m models.weights", description="download the full profiles' checkpoints")
    p.add_argument("names", nargs="*", default=list(WEIGHTS), help=f"default: all of {', '.join(WEIGHTS)}")
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    a = p.parse_args(argv)
    unknown = [n for n in a.names if n not in WEIGHTS]
    if unknown:
        print(f"error: unknown checkpoint(s) {unknown}; known: {', '.join(WEIGHTS)}", file=sys.stderr)
        sys.exit(2)
    problems = fetch(a.names, Path(a.out))
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
