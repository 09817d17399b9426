"""``python -m ensemble runs`` (``make runs``): one table of every run x member, and a diff of two runs.

    python -m ensemble runs [--runs-dir runs] [--data DATA] [--sort COLUMN] [--json]
                            [--diff RUN_A RUN_B] [--html reports/index.html]

Input (every file optional; a missing or unreadable one gives "-", never a traceback):

    RUNS_DIR/<run>/<member>/                 member = <family> or <family>@<variant> (family: models.MODELS);
                                             a member is a folder with fold<k>/ folders (or an oof.csv and a
                                             known family); ensemble/, logs/, prior_boxes/ ... are not members
        member.yaml                          {family, variant, profile, set: settings that differ from the profile}
        scores.json                          {metric: map|auc, pooled, folds: {k: figure}, fold_mean, test, written}
        oof.csv                              the merged out-of-fold table (scored now when scores.json is absent)
        fold<k>/{config.yaml, metrics.csv, oof.csv, inputs.json}   inputs.json: data, folds, train_seconds, ...
    RUNS_DIR/<run>/ensemble/<set>/params.json   a tuned ensemble set (nested_map, oof_map, gate)
    RUNS_DIR/<run>/ensemble/<set>/scores.json   {test_map, ...}
    RUNS_DIR/<run>/ensemble/data.json           the data folder ``ensemble submit`` recorded

Output: the table on stdout (plain aligned text, or ``--json``: a JSON list of row dicts, with
``--diff`` an object ``{"rows": [...], "diff": [...]}``), and the same as a self-contained HTML page
(``--html``, default ``reports/index.html``, written every time; no external assets), whose path is
the last line of the console output (on stderr under ``--json``, so stdout stays JSON).

Columns (also the names ``--sort`` takes; figures and dates sort descending, text ascending, "-" last):
run, member, family, variant, profile, settings (those that differ from the profile; where a job runs,
device/gpus/workers, is never one), folds (folds with an oof.csv / the run's fold count), metric
(mAP@0.4, or ROC AUC for a classifier), pooled (every OOF image scored at once), fold_mean (each fold
scored alone, then averaged: the honest single-model figure; for an ensemble set its nested OOF mAP,
tuned without fold k and scored on fold k), test, train_time (seconds, summed over folds), disk (bytes of the
member's folder: weights, logs, tables; each run's total follows the table), date (the member's newest file)
and from (where the figures come from: scores.json, params.json, or "computed now"
from oof.csv with the real metric).

Figures computed now need the data folder's labels: the folder recorded by the run (a fold's
inputs.json ``data``, else ``ensemble/data.json``) is preferred over ``--data``, because the Makefile
always passes a DATA (the demo's by default) and a run trained on other data must not be scored
against the wrong labels. The fold file comes from inputs.json ``folds``, else ``folds/<run>.csv``.
"""
from __future__ import annotations

import datetime
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import yaml

import models as model_table
from cxr.args import Parser
from cxr.data import DataFolder, read_folds
from cxr.dataset import NO_FINDING
from cxr.io import DataError, atomic_path, one_line_errors
from ensemble.ensemble import params_from_dict
from ensemble.provenance import MODELS_DIR, PROFILES, training_data
from models.members import WHERE_IT_RUNS  # where and how a job runs: never a "setting" here

COLUMNS = ("run", "member", "family", "variant", "profile", "settings", "folds", "metric", "pooled", "fold_mean",
           "test", "train_time", "disk", "date", "from")
FIGURES = ("pooled", "fold_mean", "test", "train_time", "disk")  # numbers: sorted numerically
DESCENDING = (*FIGURES, "date")  # best / longest / newest first
NOT_MEMBERS = frozenset({"ensemble", "logs", "prior_boxes"})
INPUT_KEYS = ("data", "labels_sha256", "folds", "folds_sha256", "split_sha256")  # inputs.json keys the diff compares
HONEST = ("fold_mean is the figure to trust: each fold's images scored alone by the model that did not train on "
          "them, then averaged (for an ensemble set: nested OOF mAP, tuned without fold k and scored on fold k); "
          "pooled scores all OOF images at once (for an ensemble set on the OOF that tuned it: optimistic).")
COMPUTED = "computed now"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (a figure written as null, text, NaN)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fold_dirs(member: Path) -> dict[int, Path]:
    if not member.is_dir():
        return {}
    return dict(sorted((int(d.name[4:]), d) for d in member.iterdir()
                       if d.is_dir() and d.name.startswith("fold") and d.name[4:].isdigit()))


def _newest(folder: Path) -> str | None:
    """ISO minute of the newest file under ``folder`` (None when it holds none)."""
    try:
        times = [p.stat().st_mtime for p in folder.rglob("*") if p.is_file()]
    except OSError:
        return None
    if not times:
        return None
    return datetime.datetime.fromtimestamp(max(times)).isoformat(timespec="minutes")


def run_names(runs_dir: Path) -> list[str]:
    """The folders of ``runs_dir`` (hidden ones left out), sorted."""
    if not runs_dir.is_dir():
        return []
    return sorted(d.name for d in runs_dir.iterdir() if d.is_dir() and not d.name.startswith("."))


def member_names(run: Path) -> list[str]:
    """Member folders of one run: fold<k>/ folders, or a merged oof.csv under a known family's name."""
    out = []
    for d in sorted(p for p in run.iterdir() if p.is_dir() and not p.name.startswith(".")) if run.is_dir() else []:
        if d.name in NOT_MEMBERS:
            continue
        if _fold_dirs(d) or ((d / "oof.csv").is_file() and d.name.partition("@")[0] in model_table.MODELS):
            out.append(d.name)
    return out


def closest_profile(saved: dict, family: str) -> tuple[str, dict]:
    """(profile name, {key: trained value}) of a fold's resolved config: the ``models/<family>/{demo,full}.yaml``
    with the fewest keys set otherwise, as :func:`ensemble.provenance.model_info` picks it, but by family (a
    variant folder ``yolo@s640`` compares with ``models/yolo/``) and without where it ran."""
    if not saved:
        return "unknown", {}
    best: tuple[int, str, dict] | None = None
    for name in PROFILES:
        profile = _read_yaml(MODELS_DIR / family / f"{name}.yaml")
        if not profile:
            continue
        changes = {k: saved.get(k) for k, v in profile.items()
                   if k in saved and saved.get(k) != v and k not in WHERE_IT_RUNS}
        if best is None or len(changes) < best[0]:
            best = (len(changes), name, changes)
    if best is None or best[0] > max(3, len(saved) // 3):  # far from both: call it what it is
        return "custom", {}
    return best[1], best[2]


def first_config(member: Path) -> dict:
    """The resolved config of the member's first fold that has one ({} when none)."""
    return next((c for d in _fold_dirs(member).values() if (c := _read_yaml(d / "config.yaml"))), {})


@dataclass
class Scorer:
    """Scores a member's oof.csv with the real metric; data folders' truth and fold files read once."""

    given_data: Path | None = None
    runs_dir: Path = Path("runs")
    _truth: dict[Path, tuple[pd.DataFrame, pd.DataFrame]] = field(default_factory=dict)
    _folds: dict[Path, pd.DataFrame] = field(default_factory=dict)

    def data_for(self, run: Path, member: Path) -> Path | None:
        """The run's own record first (see the module docstring), then ``--data``."""
        recorded = [_read_json(d / "inputs.json").get("data") for d in _fold_dirs(member).values()]
        candidates = [*(r for r in recorded if isinstance(r, str)), training_data(run).path, self.given_data]
        return next((Path(c) for c in candidates if c and (Path(c) / "train.csv").is_file()), None)

    def fold_file_for(self, run: Path, member: Path) -> Path | None:
        named = [_read_json(d / "inputs.json").get("folds") for d in _fold_dirs(member).values()]
        candidates = [Path(n) for n in named if isinstance(n, str)] + [Path("folds") / f"{run.name}.csv"]
        for c in candidates:
            # a relative path is relative to where the pipeline ran: here, or the tree holding the runs folder
            for path in ([c] if c.is_absolute() else [c, self.runs_dir.resolve().parent / c]):
                if path.is_file():
                    return path
        return None

    def folds(self, path: Path) -> pd.DataFrame:
        if path not in self._folds:
            self._folds[path] = read_folds(path)
        return self._folds[path]

    def truth(self, data: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(scoring boxes, reader-level labels) of a data folder."""
        from cxr.metric import ground_truth

        key = data.resolve()
        if key not in self._truth:
            labels = DataFolder(key).labels
            self._truth[key] = (ground_truth(labels), labels)
        return self._truth[key]


def oof_figures(oof: Path, classifier: bool, data: Path, folds: pd.DataFrame,
                scorer: Scorer | None = None) -> tuple[float | None, dict[int, float | None]]:
    """(pooled figure, {fold: figure}) of one OOF table over the fold file's images: mAP@0.4 of a
    detector's boxes (the competition metric), ROC AUC of a classifier's p_abnormal (image abnormal =
    any reader marked a finding). Raises on a table that does not fit the fold file or the data."""
    gt, labels = (scorer or Scorer()).truth(data)
    ids = folds["image_id"].tolist()
    unlabelled = set(ids) - set(labels["image_id"])
    if unlabelled:
        raise DataError(data / "train.csv", f"{len(unlabelled)} image(s) of the fold file have no label here "
                                            f"(another data folder?), e.g. {sorted(unlabelled)[:3]}")
    by_fold = {int(k): g["image_id"].tolist() for k, g in folds.groupby("fold")}
    if classifier:
        from sklearn.metrics import roc_auc_score

        from cxr.predictions import read_probabilities

        abnormal = (labels["class_id"] != NO_FINDING).groupby(labels["image_id"]).any()
        p = read_probabilities(oof, ids)

        def auc(subset: list[str]) -> float | None:
            y = abnormal.loc[subset].to_numpy().astype(int)
            return float(roc_auc_score(y, p.loc[subset].to_numpy())) if len(set(y)) == 2 else None

        return auc(ids), {k: auc(v) for k, v in by_fold.items()}
    from cxr.metric import mean_average_precision
    from cxr.predictions import read_predictions

    preds = read_predictions(oof)
    pooled = mean_average_precision(gt, preds, ids)["map"]
    per_fold = {k: mean_average_precision(gt, preds[preds["image_id"].isin(v)], v)["map"] for k, v in by_fold.items()}
    return pooled, per_fold


def _train_seconds(fold: Path) -> float | None:
    """inputs.json's train_seconds, else the sum of metrics.csv's per-epoch seconds (runs before inputs.json)."""
    recorded = _number(_read_json(fold / "inputs.json").get("train_seconds"))
    if recorded is not None:
        return recorded
    try:
        seconds = pd.read_csv(fold / "metrics.csv")["seconds"].dropna()
    except (OSError, ValueError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return None
    return float(seconds.sum()) if len(seconds) else None


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def member_row(run: Path, name: str, scorer: Scorer) -> dict:
    """One row of the table: a member folder of ``run``."""
    folder = run / name
    notes: list[str] = []
    info = _read_yaml(folder / "member.yaml")
    family = str(info.get("family") or name.partition("@")[0])
    variant = info.get("variant", name.partition("@")[2] or None)
    classifier = model_table.MODELS.get(family, ("", "detector"))[1] == "classifier"
    profile, settings = info.get("profile"), info.get("set")
    if settings is None and isinstance(profile, str):
        settings = {}  # member.yaml's way of saying "the profile as it is"
    if not isinstance(profile, str) or not isinstance(settings, dict):
        # runs written before member.yaml: compare the saved config with the profiles
        guessed = closest_profile(first_config(folder), family)
        profile = profile if isinstance(profile, str) else guessed[0]
        settings = settings if isinstance(settings, dict) else guessed[1]
    settings = {str(k): v for k, v in settings.items() if k not in WHERE_IT_RUNS}
    folds = _fold_dirs(folder)
    done = sum((d / "oof.csv").is_file() for d in folds.values())
    scores = _read_json(folder / "scores.json")
    total: int | None = None
    pooled = fold_mean = test = None
    metric = "ROC AUC" if classifier else "mAP@0.4"
    source = "-"
    if scores:
        source = "scores.json"
        metric = {"auc": "ROC AUC", "map": "mAP@0.4"}.get(scores.get("metric"), metric)
        per_fold = scores.get("folds") if isinstance(scores.get("folds"), dict) else {}
        total = len(per_fold) or None
        pooled, test = _number(scores.get("pooled")), _number(scores.get("test"))
        fold_mean = _number(scores.get("fold_mean"))
        if fold_mean is None:
            fold_mean = _mean([_number(v) for v in per_fold.values()])
    fold_file = scorer.fold_file_for(run, folder)
    if total is None and fold_file is not None:
        try:
            total = int(scorer.folds(fold_file)["fold"].nunique())
        except DataError as e:
            notes.append(f"fold file unreadable: {e}")
    if not scores and (folder / "oof.csv").is_file():
        data = scorer.data_for(run, folder)
        if data is None:
            notes.append("no scores.json and no data folder known (pass --data): OOF figures not computed")
        elif fold_file is None:
            notes.append(f"no scores.json and no fold file (inputs.json folds, folds/{run.name}.csv): "
                         "OOF figures not computed")
        else:
            try:
                pooled, per_fold_now = oof_figures(folder / "oof.csv", classifier, data, scorer.folds(fold_file),
                                                   scorer)
                fold_mean = _mean(list(per_fold_now.values()))
                source = COMPUTED
                notes.append(f"figures computed now from oof.csv against {data} and {fold_file}")
            except Exception as e:  # noqa: BLE001 - one bad table is a note in its row, never a traceback for all
                notes.append(f"oof.csv not scored: {type(e).__name__}: {e}")
    seconds = [_train_seconds(d) for d in folds.values()]
    return {
        "run": run.name, "member": name, "family": family, "variant": variant, "profile": profile,
        "settings": settings, "folds": f"{done}/{total if total is not None else '?'}", "metric": metric,
        "pooled": pooled, "fold_mean": fold_mean, "test": test,
        "train_time": sum(s for s in seconds if s is not None) if any(s is not None for s in seconds) else None,
        "disk": disk_bytes(folder), "date": _newest(folder), "from": source, "notes": notes,
    }


def ensemble_set_rows(run: Path) -> list[dict]:
    """One row per tuned ensemble set (``run/ensemble/<set>/params.json``)."""
    rows = []
    for path in sorted((run / "ensemble").glob("*/params.json")):
        notes: list[str] = []
        try:
            params = params_from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            rows.append(_set_row(run, path.parent, {}, None, None, None, [f"params.json unreadable: {e}"]))
            continue
        gated = params.gate.rule != "none"
        key = "ensemble_gated" if gated else "ensemble"
        f = params.fusion
        settings = {"weights": ", ".join(f"{m} {w:g}" for m, w in zip(f.models, f.weights)), "iou_thr": f.iou_thr,
                    "skip_box_thr": f.skip_box_thr, "conf_type": f.conf_type, "gate": params.gate.rule}
        if gated and params.gate.rule == "hard":
            settings.update(gate_low=params.gate.low, gate_high=params.gate.high)
        nested = _number(params.nested_map.get(key))
        if nested is None:
            notes.append("no nested OOF figure in params.json (tuned before nested OOF was recorded): tune again")
        scores = _read_json(path.parent / "scores.json")
        rows.append(_set_row(run, path.parent, settings, _number(params.oof_map.get(key)), nested,
                             _number(scores.get("test_map")), notes))
    return rows


def _set_row(run: Path, folder: Path, settings: dict, pooled: float | None, nested: float | None,
             test: float | None, notes: list[str]) -> dict:
    return {"run": run.name, "member": folder.name, "family": "ensemble", "variant": None, "profile": None,
            "settings": settings, "folds": "-", "metric": "mAP@0.4", "pooled": pooled, "fold_mean": nested,
            "test": test, "train_time": None, "disk": disk_bytes(folder), "date": _newest(folder),
            "from": "params.json", "notes": notes}


def collect(runs_dir: Path, data: Path | None = None) -> list[dict]:
    """Every row: each run's members (folder order), then its ensemble sets."""
    scorer = Scorer(data, runs_dir)
    rows = []
    for name in run_names(runs_dir):
        run = runs_dir / name
        rows += [member_row(run, m, scorer) for m in member_names(run)]
        rows += ensemble_set_rows(run)
    return rows


def sort_rows(rows: list[dict], column: str | None) -> list[dict]:
    """Rows sorted by ``column`` (figures and dates descending, text ascending; missing last; stable)."""
    if column is None:
        return list(rows)
    if column not in COLUMNS:
        raise DataError("--sort", f"unknown column {column!r}; columns: {', '.join(COLUMNS)}")
    known = [r for r in rows if cell(r, column) != "-"]
    missing = [r for r in rows if cell(r, column) == "-"]
    key: Callable[[dict], Any] = ((lambda r: float(r[column])) if column in FIGURES else (lambda r: cell(r, column)))
    return sorted(known, key=key, reverse=column in DESCENDING) + missing


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (links not followed: a borrowed member is counted in its own run)."""
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # removed meanwhile
            pass
    return total


def size_text(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def cell(row: dict, column: str) -> str:
    """The text of one cell ("-" for a missing figure)."""
    v = row.get(column)
    if v is None or v == {} or v == "":
        return "-"
    if column == "settings":
        return ", ".join(f"{k}={_value(x)}" for k, x in v.items())
    if column == "train_time":
        return _duration(v)
    if column == "disk":
        return size_text(v)
    if column in FIGURES:
        return f"{v:.4f}"
    return str(v)


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def aligned(header: Sequence[str], lines: Sequence[Sequence[str]], right: Sequence[bool] | None = None) -> str:
    """Plain text table: columns padded to their widest cell, figures right-aligned."""
    right = right or [False] * len(header)
    widths = [max([len(h), *(len(l[i]) for l in lines)]) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join((c.rjust(w) if r else c.ljust(w)) for c, w, r in zip(cells, widths, right)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(l) for l in lines)])


def table_text(rows: list[dict]) -> str:
    lines = [[_short(cell(r, c)) for c in COLUMNS] for r in rows]
    return aligned(COLUMNS, lines, [c in FIGURES for c in COLUMNS])


def _settings_of(runs_dir: Path, run: str, member: str) -> dict:
    """What the diff compares: a member's first fold config (+ its inputs.json's data and folds), or a set's
    fusion and gate."""
    folder = runs_dir / run / member
    if (runs_dir / run / "ensemble" / member / "params.json").is_file() and not _fold_dirs(folder):
        return {}
    config = {k: v for k, v in first_config(folder).items() if k not in WHERE_IT_RUNS}
    inputs = next((i for d in _fold_dirs(folder).values() if (i := _read_json(d / "inputs.json"))), {})
    return {**config, **{f"inputs.{k}": inputs[k] for k in INPUT_KEYS if k in inputs}}


def check_runs(runs_dir: Path, names: Sequence[str]) -> None:
    """A :class:`DataError` naming the runs that exist when one of ``names`` is not a run of ``runs_dir``."""
    known = run_names(runs_dir)
    for name in names:
        if name not in known:
            raise DataError(runs_dir, f"no run {name!r} to diff; runs: {', '.join(known) or 'none'}")


def diff_runs(runs_dir: Path, a: str, b: str, rows: list[dict]) -> list[dict]:
    """``{member, what, a, b}`` lines: for every member or ensemble set of either run, the settings whose
    values differ (fold config, data and fold file; a set's fusion and gate), then its figures side by side."""
    check_runs(runs_dir, (a, b))
    by = {(r["run"], r["member"]): r for r in rows}
    members = sorted({r["member"] for r in rows if r["run"] in (a, b) and r["family"] != "ensemble"})
    sets = sorted({r["member"] for r in rows if r["run"] in (a, b) and r["family"] == "ensemble"})
    out = []
    for member in [*members, *sets]:
        ra, rb = by.get((a, member)), by.get((b, member))
        line = lambda what, x, y: out.append({"member": member, "what": what, "a": x, "b": y})
        if ra is None or rb is None:
            line("present", "yes" if ra else "absent", "yes" if rb else "absent")
        is_set = (ra or rb)["family"] == "ensemble"
        if is_set:
            sa, sb = (ra or {}).get("settings") or {}, (rb or {}).get("settings") or {}
        else:
            sa, sb = _settings_of(runs_dir, a, member), _settings_of(runs_dir, b, member)
        if ra and rb:  # an absent member differs in everything: its figures say enough
            for k in dict.fromkeys([*sa, *sb]):
                if sa.get(k, "<unset>") != sb.get(k, "<unset>"):
                    line(k, _value(sa.get(k, "<unset>")), _value(sb.get(k, "<unset>")))
        metric = (ra or rb)["metric"]
        if is_set:
            figures = [(f"nested OOF {metric}", "fold_mean"), (f"pooled in-sample {metric}", "pooled"),
                       ("test mAP", "test")]
        else:
            figures = [(f"pooled OOF {metric}", "pooled"), (f"fold mean {metric}", "fold_mean"), ("test", "test"),
                       ("train_time", "train_time")]
        for what, column in figures:
            line(what, cell(ra, column) if ra else "-", cell(rb, column) if rb else "-")
    return out


def diff_text(a: str, b: str, lines: list[dict]) -> str:
    head = (f"diff {a} vs {b}: settings from each member's first fold config.yaml and inputs.json (only keys that "
            f"differ; device, gpus, workers, checkpoint_minutes left out), ensemble sets' fusion and gate; figures side by side")
    if not lines:
        return head + "\n(neither run has a member)"
    cells = [[line["member"], line["what"], _short(line["a"], 40), _short(line["b"], 40)] for line in lines]
    return head + "\n" + aligned(["member", "what", a, b], cells)


STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:3px 6px;vertical-align:top}
th{background:#f0f0f0;cursor:pointer;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.ens td{background:#f6f8ff}td.honest{font-weight:bold}.muted{color:#666}ul.notes{font-size:13px}"""
# Click a header to sort the table by it (figures descending); inline, so the page opens offline.
SCRIPT = """document.querySelectorAll("table.sortable th").forEach((th, i) => th.addEventListener("click", () => {
  const body = th.closest("table").tBodies[0], num = th.classList.contains("num"), desc = th.classList.contains("desc");
  const val = r => r.cells[i].dataset.v ?? r.cells[i].textContent;
  const rows = [...body.rows], known = rows.filter(r => val(r) !== "-"), gone = rows.filter(r => val(r) === "-");
  known.sort((x, y) => num ? parseFloat(val(y)) - parseFloat(val(x)) : desc ? val(y).localeCompare(val(x))
                                                                           : val(x).localeCompare(val(y)));
  [...known, ...gone].forEach(r => body.appendChild(r));
}));"""


def page(rows: list[dict], runs_dir: Path, sort: str | None, diff: tuple[str, str] | None,
         diff_lines: list[dict]) -> str:
    """The self-contained HTML page: the table, its notes, and the diff section when asked."""
    e = lambda x: html.escape(str(x), quote=True)
    now = datetime.datetime.now().isoformat(timespec="minutes")
    body = [f"<h1>Runs in {e(runs_dir)}</h1>",
            f'<p class="muted">Written {e(now)} by <code>python -m ensemble runs</code>'
            f"{f' (sorted by {e(sort)})' if sort else ''}. Click a column to sort.</p>",
            f"<p><b>{e(HONEST)}</b> The <i>metric</i> column names the figure: mAP@0.4 (the competition metric) "
            "or ROC AUC (classifier members). <i>from</i>: <b>computed now</b> = scored by this page's command "
            "from the member's oof.csv (it has no scores.json yet); scores.json = written when the folds were "
            "merged; params.json = the tuned ensemble set.</p>"]
    if not rows:
        body.append(f"<p>No runs in {e(runs_dir)}.</p>")
    else:
        head = "".join(f'<th class="{"num" if c in FIGURES else "desc" if c in DESCENDING else ""}">{e(c)}'
                       f'{" *" if c == "fold_mean" else ""}</th>' for c in COLUMNS)
        trs = []
        for r in rows:
            tds = []
            for c in COLUMNS:
                text = cell(r, c)
                raw = r.get(c) if c in FIGURES and r.get(c) is not None else None
                cls = " ".join(x for x in ("n" if c in FIGURES else "", "honest" if c == "fold_mean" else "") if x)
                value = f' data-v="{raw!r}"' if raw is not None else ""  # the full figure, for the sort
                tds.append(f'<td class="{cls}"{value}>{e(text)}</td>')
            trs.append(f'<tr class="{"ens" if r["family"] == "ensemble" else ""}">{"".join(tds)}</tr>')
        body.append(f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(trs)}</tbody></table>')
        body.append(f'<p class="muted">* {e(HONEST)}</p>')
        notes = [(f"{r['run']}/{r['member']}", n) for r in rows for n in r.get("notes", [])]
        if notes:
            items = "".join(f"<li><b>{e(w)}</b>: {e(n)}</li>" for w, n in notes)
            body.append(f'<h2>Notes</h2><ul class="notes">{items}</ul>')
    for run, ablation in ablations(runs_dir).items():
        body += ablation_html(run, ablation)
    if diff:
        a, b = diff
        body.append(f'<h2 id="diff">Diff: {e(a)} vs {e(b)}</h2><p class="muted">Settings from each member\'s '
                    "first fold config.yaml and inputs.json, only the keys whose values differ (device, gpus, "
                    "workers left out); ensemble sets' fusion and gate; then the figures side by side.</p>")
        trs = "".join("<tr>" + "".join(f"<td>{e(line[k])}</td>" for k in ("member", "what", "a", "b")) + "</tr>"
                      for line in diff_lines)
        body.append(f"<table><thead><tr><th>member</th><th>what</th><th>{e(a)}</th><th>{e(b)}</th></tr></thead>"
                    f"<tbody>{trs}</tbody></table>")
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Runs</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + f"\n<script>{SCRIPT}</script></body></html>\n")


def _fig(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def ablation_html(run: str, ablation: dict) -> list[str]:
    """The ablation table of ``runs/<run>/ablation.json`` as HTML (``make runs``' page and the run's report)."""
    def e(x: Any) -> str:
        return html.escape(str(x), quote=True)

    rows_ = ablation.get("rows", [])
    none = next((r for r in rows_ if r.get("lever") == "none"), {})
    head = ("<tr><th>lever</th><th>member</th><th>what</th><th>member OOF</th><th>ensemble without</th>"
            "<th>with it added</th><th>with it instead</th><th>member test</th><th>make oof (s)</th></tr>")
    trs = "".join(
        "<tr>" + "".join(f"<td>{e(v)}</td>" for v in (
            r.get("lever"), r.get("member"), r.get("what"), _fig(r.get("fold_mean")), _fig(none.get("ensemble")),
            _fig(r.get("ensemble")) if r.get("lever") != "none" else "-", _fig(r.get("ensemble_instead")),
            _fig(r.get("test")), _fig(r.get("seconds")))) + "</tr>" for r in rows_)
    return [f'<h2 id="ablation-{e(run)}">Ablation: the winners\' levers on {e(run)} (bench/levers.py)</h2>'
            f'<p class="muted">Each lever is a variant of {e(ablation.get("family"))}; every figure is a nested '
            "OOF mAP@0.4 (member: fold mean; ensemble: tuned without fold k, scored on fold k); test mAP reported, "
            "never used to choose.</p>", f"<table><thead>{head}</thead><tbody>{trs}</tbody></table>"]


def read_ablation(run: Path) -> dict:
    """``run/ablation.json`` (bench/levers.py writes it) when it has rows, else ``{}``."""
    d = _read_json(Path(run) / "ablation.json")
    return d if d.get("rows") else {}


def ablations(runs_dir: Path) -> dict[str, dict]:
    """``runs/<run>/ablation.json`` of every run that has one."""
    return {name: d for name in run_names(runs_dir) if (d := read_ablation(Path(runs_dir) / name))}


def write_page(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = Parser(prog="python -m ensemble runs", description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs", help="folder of runs (default: runs)")
    p.add_argument("--data", default=None, help="data folder to score members without scores.json (a run's own "
                                                "record comes first)")
    p.add_argument("--sort", default=None, metavar="COLUMN", help=f"one of: {', '.join(COLUMNS)}")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--diff", nargs=2, default=None, metavar=("RUN_A", "RUN_B"), help="settings and figures of two runs")
    p.add_argument("--html", default="reports/index.html", help="the page (default: reports/index.html)")
    a = p.parse_args(argv)
    runs_dir = Path(a.runs_dir)
    with one_line_errors():
        if a.sort is not None:
            sort_rows([], a.sort)  # an unknown column stops before any file is read
        if a.diff:
            check_runs(runs_dir, a.diff)  # before the figures are computed
        rows = sort_rows(collect(runs_dir, Path(a.data) if a.data else None), a.sort)
        diff_lines = diff_runs(runs_dir, *a.diff, rows) if a.diff else []
        out = write_page(Path(a.html), page(rows, runs_dir, a.sort, tuple(a.diff) if a.diff else None, diff_lines))
        if a.json:
            print(json.dumps({"rows": rows, "diff": diff_lines} if a.diff else rows, indent=1, default=str))
            print(f"page: {out}", file=sys.stderr)
            return
        if not rows:
            print(f"no runs in {runs_dir}/")
        else:
            print(table_text(rows))
            print("disk: " + ", ".join(f"{name} {size_text(disk_bytes(runs_dir / name))}"
                                       for name in dict.fromkeys(r["run"] for r in rows)))
            print(f"* {HONEST}")
            for r in rows:
                for n in r.get("notes", []):
                    print(f"note: {r['run']}/{r['member']}: {n}")
            for run in ablations(runs_dir):
                table = runs_dir / run / "ablation.md"
                if table.is_file():
                    print(f"\nablation of run {run} (bench/levers.py; nested OOF figures):\n{table.read_text().strip()}")
        if a.diff:
            print()
            print(diff_text(*a.diff, diff_lines))
        print(f"page: {out}")


if __name__ == "__main__":
    main()
