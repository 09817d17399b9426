"""The winners' levers, measured on a finished run: each as a variant of one member, trained (or predicted)
through make, and every figure a nested OOF one (nothing chosen on test labels).

    python bench/levers.py                      # on runs/demo (make demo first), member effdet
    python bench/levers.py --name demo --family effdet --only tta,snap

Levers (each a variant of FAMILY in run NAME; its settings in --set form, as make's SET):

    sel      reader selection, the 2nd place's rule: no abnormal image read only by R8, R9 and R10
    stage2   the 2nd place's second stage: from FAMILY's own fold weights, every reader's boxes (keep_all) on
             the selected images, LR / 4, half the epochs
    tta      multi-scale TTA on FAMILY's weights (share_weights: no training): hflip and 2x the input side
    snap     checkpoint views: 2 snapshots of the second half of training fused with the final weights

For each lever the table gives the member's OOF mAP@0.4 (fold mean, each fold scored alone) and the nested
OOF mAP@0.4 of the tuned ensemble (WBF + gate, tuned without fold k and scored on fold k) of the run's
detectors without it, with it added, and with it instead of FAMILY; test mAP where the data has test labels
(reported, never used to choose). Writes ``runs/NAME/ablation.json`` and ``ablation.md`` (``make runs``
shows them) and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr.io import DataError, one_line_errors, write_json  # noqa: E402
from ensemble.ensemble import params_from_dict, params_path  # noqa: E402
from models import names  # noqa: E402

LEVERS: dict[str, tuple[str, list[str]]] = {
    "sel": ("reader selection (2nd place: drop abnormal images read only by R8, R9, R10)",
            ["labels.images_read_only_by=[R8,R9,R10]"]),
    "stage2": ("second stage from the member's fold weights (keep_all, selected readers, LR / 4, half the epochs)",
               ["weights={family}", "lr={lr_quarter}", "epochs={half_epochs}", "labels.mode=keep_all",
                "labels.images_read_only_by=[R8,R9,R10]"]),
    "tta": ("multi-scale TTA on the member's weights: plain, hflip, 2x the input side (share_weights)",
            ["share_weights={family}", "tta=[hflip,2]"]),
    "snap": ("checkpoint views: 2 snapshots of the second half of training + the final weights",
             ["snapshots=2", "checkpoint_views=true"]),
}


def make(*args: str) -> float:
    """Run ``make ARGS`` in the repo (its output on this console); seconds taken. A failure stops the bench."""
    started = time.time()
    print("+ make " + " ".join(args), flush=True)
    subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, check=True)
    return time.time() - started


def member_figures(run: Path, member: str) -> dict:
    scores = json.loads((run / member / "scores.json").read_text())
    return {"fold_mean": scores.get("fold_mean"), "test": scores.get("test")}


def ensemble_figure(run: Path, members: list[str], classifier: str) -> dict:
    """The nested OOF mAP of a tuned set (gated when its gate is on) and the weights it chose."""
    params = params_from_dict(json.loads(params_path(run, members, classifier).read_text()))
    key = "ensemble_gated" if params.gate.rule != "none" else "ensemble"
    weights = dict(zip(params.fusion.models, params.fusion.weights))
    return {"nested": params.nested_map.get(key), "weights": weights}


def profile_value(family: str, key: str) -> float:
    import yaml

    return yaml.safe_load((REPO / "models" / family / "demo.yaml").read_text())[key]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="demo", help="the run (runs/NAME), finished with make demo or make pipeline")
    p.add_argument("--data", default="data/demo")
    p.add_argument("--family", default="effdet", help="the member whose variants the levers are")
    p.add_argument("--only", default=",".join(LEVERS), help=f"levers to measure ({','.join(LEVERS)})")
    a = p.parse_args(argv)
    run = REPO / "runs" / a.name
    base = [m for m in names("detector")]
    levers = [x for x in a.only.split(",") if x]
    with one_line_errors():  # before the first make: a typo costs no minutes of training
        unknown = [x for x in levers if x not in LEVERS]
        if unknown:
            raise DataError("--only", f"{', '.join(unknown)}: not a lever ({', '.join(LEVERS)})")
        if a.family not in base:
            raise DataError("--family", f"{a.family!r} is not a detector ({', '.join(base)})")
        if not (run / a.family).is_dir():
            raise DataError(run, f"no {a.family} member in this run: make demo (or make pipeline NAME={a.name}) first")
    classifier = "classifier"
    common = [f"NAME={a.name}", f"DATA={a.data}"]
    fill = {"family": a.family, "lr_quarter": profile_value(a.family, "lr") / 4,
            "half_epochs": max(1, int(profile_value(a.family, "epochs")) // 2)}
    rows = []
    make("ensemble", *common, f"MODELS={' '.join(base)}")
    without = ensemble_figure(run, base, classifier)
    rows.append({"lever": "none", "member": a.family, "what": "the run's members as they are",
                 **member_figures(run, a.family), "ensemble": without["nested"], "ensemble_instead": None,
                 "seconds": None})
    for lever in levers:
        what, sets = LEVERS[lever]
        member = f"{a.family}@{lever}"
        seconds = make("oof", *common, f"MODEL={a.family}", f"VARIANT={lever}",
                       "SET=" + " ".join(s.format(**fill) for s in sets))
        added = [*base, member]
        instead = [member if m == a.family else m for m in base]
        make("ensemble", *common, f"MODELS={' '.join(added)}")
        make("ensemble", *common, f"MODELS={' '.join(instead)}")
        rows.append({"lever": lever, "member": member, "what": what, **member_figures(run, member),
                     "ensemble": ensemble_figure(run, added, classifier)["nested"],
                     "ensemble_instead": ensemble_figure(run, instead, classifier)["nested"],
                     "seconds": round(seconds), "settings": [s.format(**fill) for s in sets]})
    write_json({"run": a.name, "family": a.family, "rows": rows}, run / "ablation.json")
    table = ablation_markdown(rows, base)
    (run / "ablation.md").write_text(table + "\n")
    print(table)


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def ablation_markdown(rows: list[dict], base: list[str]) -> str:
    """The ablation table (README and ``make runs``)."""
    lines = [f"| lever | member | member OOF mAP (fold mean) | ensemble nested OOF: {' + '.join(base)} | "
             "... + the lever's member | ... with it instead | member test mAP | make oof (s) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    none = rows[0]
    for r in rows:
        lines.append(f"| {r['lever']} | {r['member']} | {_f(r['fold_mean'])} | {_f(none['ensemble'])} | "
                     f"{_f(r['ensemble']) if r['lever'] != 'none' else '-'} | {_f(r['ensemble_instead'])} | "
                     f"{_f(r['test'])} | {r['seconds'] if r['seconds'] is not None else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
