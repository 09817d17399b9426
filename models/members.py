"""Members of a run: a family of the model table, a named variant of it, or one borrowed from another run.

How a member is written (``MODELS="yolo yolo@s640 demo:detectron"``, ``VARIANT=s640``)::

    yolo             runs/NAME/yolo/          the family's own member
    yolo@s640        runs/NAME/yolo@s640/     a variant: the same family, its own settings, folder and curves
    demo:detectron   runs/demo/detectron/     borrowed from run ``demo``, whose fold file must be this run's

The family is always one of ``models.MODELS``: the model table stays the one list of families.

Files a member keeps beside its fold folders (each written atomically; the others read them):

``member.yaml``
    ``{family, variant, profile, set}``: the settings that make this member, beyond its profile (``set``
    never holds where or how a job runs: device, gpus, workers, checkpoint_minutes). Later commands without ``SET`` use them, so
    ``make submission`` rebuilds a variant as it was made; a ``SET`` changes the keys it names.
``fold<k>/inputs.json``
    What fold k was trained on: the data folder, a hash of its labels, its image size, the fold file and
    a hash of fold k's split, and the seconds its training took. A finished fold is reused only while
    these and its settings are unchanged (:func:`changed_inputs`).
``scores.json``
    Written by ``merge``: the OOF figure pooled and per fold (mAP@0.4, or ROC AUC for the classifier), the
    fold mean (the honest single-model figure), the test figure where the data has test labels.

This module imports neither torch nor a framework: the scheduler and ``make runs`` read it.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from cxr.io import DataError, atomic_path, sha256, write_json
from models import MODELS

MEMBER_FILE = "member.yaml"
INPUTS_FILE = "inputs.json"
SCORES_FILE = "scores.json"
_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # cxr.args.PLAIN_NAME_RE: no '/', no '..' at the start, no spaces
MEMBER_RE = re.compile(rf"(?:(?P<run>{_NAME}):)?(?P<family>[A-Za-z0-9_]+)(?:@(?P<variant>{_NAME}))?")
# Keys that say where and how a job runs, not what it trains: a fold may resume on another machine or card
# count (the LR rule keeps the nominal batch across card counts, models.common.scale_for_gpus), with
# checkpoints written more or less often.
WHERE_IT_RUNS = frozenset({"device", "gpus", "workers", "checkpoint_minutes"})


@dataclass(frozen=True)
class Member:
    family: str  # a name of models.MODELS
    variant: str | None = None  # None: the family's own member
    run: str | None = None  # None: this run; else borrowed from runs/<run>/

    @property
    def folder_name(self) -> str:
        """The member's folder under its run: ``yolo`` or ``yolo@s640``."""
        return self.family + (f"@{self.variant}" if self.variant else "")

    def __str__(self) -> str:
        return (f"{self.run}:" if self.run else "") + self.folder_name

    def folder(self, run: str | Path) -> Path:
        """Its folder: ``run/yolo@s640``, or ``runs/<other>/detectron`` when borrowed (beside ``run``)."""
        run = Path(run)
        return (run.parent / self.run if self.run else run) / self.folder_name


def parse_member(text: str, where: str = "MODELS") -> Member:
    """``yolo``, ``yolo@s640``, ``demo:detectron`` or ``demo:yolo@s640`` -> :class:`Member`; a name that is
    not of that form, or whose family is not in the model table, is one :class:`DataError`."""
    m = MEMBER_RE.fullmatch(text.strip())
    if m is None:
        raise DataError(where, f"{text!r} is not a member: FAMILY, FAMILY@VARIANT or RUN:FAMILY[@VARIANT] "
                               f"(families: {', '.join(MODELS)}; names of letters, digits, '_', '-', '.')")
    if m["family"] not in MODELS:
        raise DataError(where, f"{text!r}: {m['family']!r} is not a model family (families: {', '.join(MODELS)})")
    return Member(m["family"], m["variant"], m["run"])


# --- member.yaml ---------------------------------------------------------------------------------------


@dataclass
class MemberRecord:
    family: str
    variant: str | None = None
    profile: str = "demo"
    set: dict[str, Any] = field(default_factory=dict)


def read_record(folder: Path) -> MemberRecord | None:
    """``folder/member.yaml``, None when there is none (a run older than member files: its profile alone)."""
    path = Path(folder) / MEMBER_FILE
    if not path.is_file():
        return None
    try:
        d = yaml.safe_load(path.read_text()) or {}
        return MemberRecord(str(d["family"]), d.get("variant"), str(d.get("profile", "demo")), dict(d.get("set") or {}))
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise DataError(path, f"not a member file ({e.__class__.__name__}): delete it to start the member anew") from None


def write_record(folder: Path, record: MemberRecord) -> Path:
    path = Path(folder) / MEMBER_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(asdict(record), sort_keys=False))
    return path


def settings(folder: Path, asked: dict[str, Any]) -> dict[str, Any]:
    """The overrides a command runs the member with: its recorded ``set``, then what ``SET`` asks now."""
    record = read_record(folder)
    return {**(record.set if record else {}), **asked}


def record_settings(folder: Path, member: Member, profile: str, overrides: dict[str, Any]) -> None:
    """Write ``member.yaml`` with these overrides (where a job runs left out), when they are new."""
    kept = {k: v for k, v in overrides.items() if k not in WHERE_IT_RUNS}
    record = MemberRecord(member.family, member.variant, profile, kept)
    if read_record(folder) != record:
        write_record(folder, record)


# --- fold inputs -----------------------------------------------------------------------------------------


def split_hash(folds: pd.DataFrame, fold: int) -> str:
    """A hash of fold ``fold``'s split (which images it holds out, which it trains on), whatever the file's
    row order: two fold files that split alike give the same hash."""
    held = folds["fold"].astype(int) == int(fold)
    text = "\n".join(sorted(folds.loc[held, "image_id"].astype(str))) + "\n|\n" + \
        "\n".join(sorted(folds.loc[~held, "image_id"].astype(str)))
    return hashlib.sha256(text.encode()).hexdigest()


def image_px(data_root: Path) -> int | None:
    """The side of the data folder's squashed training images (the first one's), None when unknown."""
    from cxr.images import png_size

    first = next(iter(sorted((Path(data_root) / "train").glob("*.png"))[:1]), None)
    size = png_size(first) if first is not None else None
    return int(max(size)) if size else None


FINAL_WEIGHTS = ("weights.pt", "weights.pth")  # what each adapter's train leaves in a finished fold


def fold_start(value: str | None, run: Path, fold: int, family: str) -> str | None:
    """The checkpoint fold ``fold`` starts from, for a ``weights`` value that names one per fold (a second
    stage): a path with ``{fold}`` (``runs/stage1/yolo/fold{fold}/weights.pt``), or a member of the same
    family (``yolo``, ``yolo@stage1``, ``demo:yolo``) whose fold ``fold`` final weights it takes. Any other
    value (a public checkpoint, null) is returned as given. A first stage not trained yet is one error."""
    if not value:
        return value
    if "{fold}" in value:
        path = Path(value.replace("{fold}", str(fold)))
        if not path.is_file():
            raise DataError("weights", f"{value!r} is {path} for fold {fold}, which does not exist: train that "
                                       f"stage's fold {fold} first")
        return str(path)
    m = MEMBER_RE.fullmatch(value.strip())
    if m is None or m["family"] not in MODELS or Path(value).is_file():
        return value
    member = parse_member(value, "weights")
    if member.family != family:
        raise DataError("weights", f"{value!r} is a {member.family} member: a {family} fold cannot start from it")
    out = member.folder(run) / f"fold{fold}"
    found = [out / name for name in FINAL_WEIGHTS if (out / name).is_file()]
    if not found:
        raise DataError("weights", f"{member} has no final weights for fold {fold} ({out}/weights.pt[h]): train it "
                                   f"first (make oof MODEL={member.family}"
                                   f"{f' VARIANT={member.variant}' if member.variant else ''})")
    return str(found[0])


def start_input(value: str | None, run: Path, fold: int, family: str) -> dict[str, Any]:
    """``{"start_sha256": ...}`` when fold ``fold`` starts from weights of its own (:func:`fold_start`), so a
    retrained first stage makes the second stage's fold stale; {} for a public checkpoint or none."""
    start = fold_start(value, run, fold, family)
    return {"start_sha256": sha256(Path(start))} if start and start != value else {}


def fold_inputs(data_root: Path, folds_path: Path, folds: pd.DataFrame, fold: int) -> dict[str, Any]:
    """What fold ``fold`` trains on now (see the module docstring's ``inputs.json``)."""
    data_root = Path(data_root)
    return {"data": str(data_root.resolve()), "labels_sha256": sha256(data_root / "train.csv"),
            "image_px": image_px(data_root), "folds": str(folds_path), "folds_sha256": sha256(Path(folds_path)),
            "split_sha256": split_hash(folds, fold)}


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, {} when missing or unreadable (a run made before these files)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def read_inputs(fold_dir: Path) -> dict[str, Any]:
    """``fold_dir/inputs.json``, {} when missing or unreadable (a fold trained before these files)."""
    return _read_json(Path(fold_dir) / INPUTS_FILE)


def write_inputs(fold_dir: Path, inputs: dict[str, Any], train_seconds: float | None = None) -> Path:
    """Record ``inputs`` for the fold; ``train_seconds`` adds to what earlier attempts of it took."""
    old = read_inputs(fold_dir)
    seconds = float(old.get("train_seconds", 0.0) or 0.0) + (train_seconds or 0.0)
    return write_json({**old, **inputs, "train_seconds": round(seconds, 1),
                       "trained": old.get("trained") if train_seconds is None else
                       datetime.now().isoformat(timespec="seconds")}, Path(fold_dir) / INPUTS_FILE)


def asked_key(profile: str, profile_file: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """What a command asks of a member, before any framework resolves it: the profile (name and a hash of
    its file) and the overrides, where a job runs left out. Equal keys resolve to equal configs, so
    ``check`` needs no framework import for a fold made with the same key (inputs.json ``asked`` for its
    training, ``predicted`` for its OOF/test tables)."""
    return {"profile": profile, "profile_sha256": sha256(Path(profile_file)) if Path(profile_file).is_file() else None,
            "set": json.loads(json.dumps({k: v for k, v in sorted(overrides.items()) if k not in WHERE_IT_RUNS},
                                         default=str))}


def mark_predicted(fold_dir: Path, key: dict[str, Any]) -> None:
    """Record in ``inputs.json`` the asked key the fold's OOF/test tables were just made with."""
    old = read_inputs(fold_dir)
    if old:
        write_json({**old, "predicted": key}, Path(fold_dir) / INPUTS_FILE)


def same_as_asked(folder: Path, ks: list[int], key: dict[str, Any], inputs: dict[int, dict[str, Any]]) -> bool:
    """Whether every trained fold of ``ks`` was trained (and, where it has tables, predicted) with exactly
    ``key`` on unchanged inputs: then nothing can differ and no framework needs importing."""
    for k in ks:
        out = Path(folder) / f"fold{k}"
        if not (out / "config.yaml").is_file():
            continue
        recorded = read_inputs(out)
        if recorded.get("asked") != key or changed_inputs(recorded, inputs[k]):
            return False
        if (out / "oof.csv").is_file() and recorded.get("predicted") != key:
            return False
    return True


# What counts when a fold is reused: the labels, the images' size and the split (not where the folder is).
_INPUT_KEYS = {"labels_sha256": "labels ({data}/train.csv)", "image_px": "image size (px)",
               "split_sha256": "fold split ({folds})", "start_sha256": "the weights it starts from or shares (weights, share_weights)"}


def changed_inputs(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``['image size (px): trained 512, asked 1024', ...]``: what differs between a fold's recorded inputs
    and the inputs of the command; a key the fold did not record is not compared."""
    lines = []
    for key, what in _INPUT_KEYS.items():
        old, new = recorded.get(key), now.get(key)
        if old is None or new is None or old == new:
            continue
        label = what.format(data=now.get("data", "DATA"), folds=now.get("folds", "the fold file"))
        if key == "image_px":
            lines.append(f"{label}: trained {old}, asked {new}")
        else:
            lines.append(f"{label}: changed since training")
    return lines


def check_same_folds(folder: Path, folds: pd.DataFrame, folds_path: Path, member: Member) -> None:
    """A borrowed member must have been trained on this run's folds: each of its fold folders' recorded
    split (or, for a run older than inputs.json, the images of its fold OOF table) must be the same fold
    of ``folds``. Another fold file is refused by name: its OOF figures would be leaked, not out-of-fold."""
    ks = sorted(int(k) for k in folds["fold"].unique())
    for k in ks:
        fold_dir = Path(folder) / f"fold{k}"
        recorded = read_inputs(fold_dir)
        same: bool | None = None
        if "split_sha256" in recorded:
            same = recorded["split_sha256"] == split_hash(folds, k)
        elif (fold_dir / "oof.csv").is_file():
            ids = set(pd.read_csv(fold_dir / "oof.csv", usecols=["image_id"], dtype={"image_id": str})["image_id"])
            same = ids == set(folds.loc[folds["fold"].astype(int) == k, "image_id"].astype(str))
        if same is None:
            raise DataError(folder, f"member {member} has no fold {k} to borrow (its folds: "
                                    f"{', '.join(p.name for p in sorted(Path(folder).glob('fold*'))) or 'none'})")
        if not same:
            theirs = recorded.get("folds", "another fold file")
            raise DataError(folder, f"member {member} was trained on {theirs}, whose fold {k} is not fold {k} of "
                                    f"{folds_path}: its OOF predictions would not be out-of-fold here (borrow only "
                                    f"from a run with the same fold file)")


# --- scores.json -----------------------------------------------------------------------------------------


def read_scores(folder: Path) -> dict[str, Any]:
    """A member's ``scores.json`` (written by merge), {} when missing or unreadable."""
    return _read_json(Path(folder) / SCORES_FILE)
