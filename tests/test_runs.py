"""``python -m ensemble runs``: the run x member table, its sorting, JSON, diff and HTML page, on small real
run folders (real prediction tables scored against the synthetic benchmark's labels with the real metric)."""
from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from cxr.data import DataFolder
from cxr.dataset import BOX_COLUMNS, NO_FINDING
from cxr.folds import make_folds
from cxr.io import write_json, write_table
from cxr.metric import ground_truth, mean_average_precision
from cxr.predictions import read_predictions, write_predictions
from ensemble.runs import COLUMNS, main

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "models" / "yolo" / "demo.yaml").read_text())
ODD = "odd<i>run"  # a folder name that must be escaped in the page


def fake_predictions(gt: pd.DataFrame, keep: float, seed: int) -> pd.DataFrame:
    """A detector's table: a share of the true boxes, jittered, with random scores, plus stray boxes."""
    rng = np.random.default_rng(seed)
    hits = gt[rng.random(len(gt)) < keep].copy()
    finding = hits["class_id"] != NO_FINDING
    jitter = rng.normal(0, 1.5, (int(finding.sum()), 4))
    boxes = hits.loc[finding, BOX_COLUMNS].to_numpy(dtype=float) + jitter
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 2)
    hits.loc[finding, BOX_COLUMNS] = np.clip(boxes, 0, None)
    strays = gt[gt["class_id"] != NO_FINDING].sample(frac=0.3, random_state=seed).copy()
    strays["class_id"] = (strays["class_id"] + 1) % NO_FINDING
    out = pd.concat([hits, strays], ignore_index=True)
    out["score"] = rng.random(len(out))
    return out[["image_id", "class_id", "score", *BOX_COLUMNS]]


def write(table: pd.DataFrame, path: Path) -> None:
    """A classifier's p_abnormal table or a detector's boxes, each written the way its model writes it."""
    write_table(table, path) if "p_abnormal" in table else write_predictions(table, path)


def member(run: Path, name: str, folds: pd.DataFrame, table: pd.DataFrame | None, config: dict,
           inputs: dict | None = None, info: dict | None = None, scores: dict | None = None) -> Path:
    """A member folder as the pipeline leaves it: fold folders (config, oof, inputs.json), the merged oof.csv,
    and member.yaml / scores.json when given."""
    folder = run / name
    for k in sorted(folds["fold"].unique()):
        fold = folder / f"fold{k}"
        fold.mkdir(parents=True)
        (fold / "config.yaml").write_text(yaml.safe_dump(config))
        if table is not None:
            ids = set(folds.loc[folds["fold"] == k, "image_id"])
            part = table[table["image_id"].isin(ids)]
            write(part, fold / "oof.csv")
        if inputs is not None:
            write_json({**inputs, "train_seconds": 10.0 * (k + 1)}, fold / "inputs.json")
    if table is not None:
        write(table, folder / "oof.csv")
    if info is not None:
        (folder / "member.yaml").write_text(yaml.safe_dump(info))
    if scores is not None:
        write_json(scores, folder / "scores.json")
    return folder


@pytest.fixture(scope="module")
def tree(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """runs/{base,big,odd<i>run}: two runs of yolo and yolo@s640 (+ a classifier and an ensemble set in big)."""
    root = tmp_path_factory.mktemp("tree")
    runs = root / "runs"
    data = DataFolder(synth_dir)
    # 60 of the 150 images: the metric runs a few times per call, the tests stay at seconds
    labels = data.labels[data.labels["image_id"].isin(sorted(data.labels["image_id"].unique())[:60])]
    folds = make_folds(labels, n_folds=3, seed=0)
    (root / "folds").mkdir()
    write_table(folds, root / "folds" / "big.csv")  # big: the fold file found by the run's name
    base_folds = write_table(folds, root / "base_folds.csv")  # base: the fold file named in inputs.json
    gt = ground_truth(labels)
    tables = {"base": fake_predictions(gt, 0.4, 1), "big": fake_predictions(gt, 0.8, 2)}
    s640 = {"family": "yolo", "variant": "s640", "profile": "demo", "set": {"imgsz": 640}}

    base = runs / "base"
    inputs = {"data": str(synth_dir), "folds": str(base_folds), "labels_sha256": "a" * 64}
    # no member.yaml, no scores.json: profile from the config, figures computed now; workers is where it ran
    member(base, "yolo", folds, tables["base"], {**DEMO, "workers": 0}, inputs)
    member(base, "yolo@s640", folds, tables["base"], {**DEMO, "imgsz": 640}, inputs, s640,
           {"metric": "map", "pooled": 0.31, "folds": {"0": 0.3, "1": 0.28, "2": 0.29}, "fold_mean": 0.29,
            "test": 0.27})
    write_predictions(tables["base"], base / "prior_boxes" / "fold0" / "oof.csv")  # not a member, fold folder or not
    (base / "logs").mkdir()

    big = runs / "big"
    write_json({"path": str(synth_dir), "synthetic": True}, big / "ensemble" / "data.json")
    member(big, "yolo", folds, tables["big"], {**DEMO, "epochs": 30}, None, None,
           {"metric": "map", "pooled": 0.2, "folds": {"0": 0.18, "1": 0.19, "2": 0.2}, "fold_mean": 0.19, "test": None})
    member(big, "yolo@s640", folds, tables["big"], {**DEMO, "imgsz": 640}, None, s640,
           {"metric": "map", "pooled": 0.45, "folds": {"0": 0.4, "1": 0.41, "2": 0.42}, "fold_mean": 0.41,
            "test": None})
    abnormal = (labels["class_id"] != NO_FINDING).groupby(labels["image_id"]).any()
    rng = np.random.default_rng(5)
    probs = pd.DataFrame({"image_id": abnormal.index,
                          "p_abnormal": np.clip(0.5 * abnormal.to_numpy() + 0.6 * rng.random(len(abnormal)), 0, 1)})
    # no scores.json: scored now against the data folder of data.json, with the fold file folds/big.csv
    member(big, "classifier", folds, probs, {"model": "tf_efficientnet_b0", "imgsz": 128})
    sets = big / "ensemble" / "yolo-yolo@s640+classifier"
    write_json({"fusion": {"models": ["yolo", "yolo@s640"], "weights": [1.0, 2.0]},
                "gate": {"rule": "soft", "low": 0.0, "high": 1.0},
                "oof_map": {"ensemble": 0.5, "ensemble_gated": 0.52},
                "nested_map": {"ensemble": 0.44, "ensemble_gated": 0.46}}, sets / "params.json")
    write_json({"test_map": 0.43, "test_map_ungated": 0.4}, sets / "scores.json")

    odd = runs / ODD / "yolo"  # every file missing or unreadable
    (odd / "fold0").mkdir(parents=True)
    (odd / "scores.json").write_text("{not json")
    (odd / "member.yaml").write_text(": [ unclosed")
    (odd / "fold0" / "config.yaml").write_text("- a list, not a mapping")
    out = {"root": root, "runs": runs, "data": synth_dir, "folds": folds, "gt": gt, "tables": tables, "probs": probs,
           "abnormal": abnormal}
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["--runs-dir", str(runs), "--html", str(root / "reports" / "index.html"), "--json"])
    return {**out, "rows": json.loads(buf.getvalue())}  # the plain --json table, read once for the tests


def run(tree: dict, capsys: pytest.CaptureFixture, *args: str) -> tuple[str, str]:
    main(["--runs-dir", str(tree["runs"]), "--html", str(tree["root"] / "reports" / "index.html"), *args])
    out = capsys.readouterr()
    return out.out, out.err


def rows(tree: dict, capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    return json.loads(run(tree, capsys, "--json", *args)[0])


def by_key(table: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["run"], r["member"]): r for r in table}


def test_both_runs_list_their_members_settings_and_figures(tree: dict, capsys: pytest.CaptureFixture) -> None:
    table = tree["rows"]
    assert set(table[0]) >= set(COLUMNS)
    got = by_key(table)
    assert set(got) == {("base", "yolo"), ("base", "yolo@s640"), ("big", "classifier"), ("big", "yolo"),
                        ("big", "yolo@s640"), ("big", "yolo-yolo@s640+classifier"), (ODD, "yolo")}
    for name in ("base", "big"):
        s640 = got[name, "yolo@s640"]
        assert (s640["family"], s640["variant"], s640["profile"], s640["settings"]) == ("yolo", "s640", "demo",
                                                                                        {"imgsz": 640})
        assert (s640["folds"], s640["from"]) == ("3/3", "scores.json")
    assert (got["base", "yolo@s640"]["pooled"], got["base", "yolo@s640"]["fold_mean"],
            got["base", "yolo@s640"]["test"]) == (0.31, 0.29, 0.27)
    assert got["big", "yolo@s640"]["test"] is None
    # without member.yaml: the closest profile and what differs from it, never where it ran (workers)
    assert (got["base", "yolo"]["profile"], got["base", "yolo"]["settings"]) == ("demo", {})
    assert (got["big", "yolo"]["profile"], got["big", "yolo"]["settings"]) == ("demo", {"epochs": 30})
    assert got["base", "yolo"]["train_time"] == 10 + 20 + 30
    assert got["big", "yolo"]["train_time"] is None  # no inputs.json, no metrics.csv
    ens = got["big", "yolo-yolo@s640+classifier"]
    assert (ens["family"], ens["pooled"], ens["fold_mean"], ens["test"]) == ("ensemble", 0.52, 0.46, 0.43)
    odd = got[ODD, "yolo"]
    assert (odd["folds"], odd["pooled"], odd["fold_mean"], odd["test"], odd["from"]) == ("0/?", None, None, None, "-")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d", got["base", "yolo"]["date"])
    member = tree["runs"] / "base" / "yolo"
    assert got["base", "yolo"]["disk"] == sum(f.stat().st_size for f in member.rglob("*") if f.is_file()) > 0

    text, _ = run(tree, capsys)
    lines = text.splitlines()
    assert lines[0].split() == list(COLUMNS)
    s640_line = next(l for l in lines if l.startswith("big ") and " yolo@s640 " in l)
    assert "imgsz=640" in s640_line and "0.4500" in s640_line and "0.4100" in s640_line
    assert "fold_mean is the figure to trust" in text
    assert re.search(r"^disk: base [\d.]+ [kMG]?B, ", text, flags=re.M), text
    assert next(l for l in lines if l.startswith(ODD)).split()[8:11] == ["-", "-", "-"]
    assert lines[-1] == f"page: {tree['root'] / 'reports' / 'index.html'}"


def test_figures_without_scores_json_are_the_metric_computed_directly(tree: dict) -> None:
    got = by_key(tree["rows"])
    folds, gt = tree["folds"], tree["gt"]
    preds = read_predictions(tree["runs"] / "base" / "yolo" / "oof.csv")
    pooled = mean_average_precision(gt, preds, folds["image_id"])["map"]
    per_fold = [mean_average_precision(gt, preds[preds["image_id"].isin(g["image_id"])], g["image_id"])["map"]
                for _, g in folds.groupby("fold")]
    row = got["base", "yolo"]
    assert (row["from"], row["folds"], row["metric"]) == ("computed now", "3/3", "mAP@0.4")
    assert row["pooled"] == pytest.approx(pooled, abs=1e-12) and row["fold_mean"] == pytest.approx(np.mean(per_fold))
    assert 0.05 < pooled < 0.95 and pooled != pytest.approx(np.mean(per_fold))  # figures that tell tables apart
    clf = got["big", "classifier"]
    ids = tree["folds"]["image_id"]
    p = tree["probs"].set_index("image_id")["p_abnormal"]
    y = tree["abnormal"]
    assert (clf["metric"], clf["from"]) == ("ROC AUC", "computed now")
    assert clf["pooled"] == pytest.approx(roc_auc_score(y.loc[ids].astype(int), p.loc[ids]))
    per_fold_auc = [roc_auc_score(y.loc[f].astype(int), p.loc[f]) for f in folds.groupby("fold")["image_id"].agg(list)]
    assert clf["fold_mean"] == pytest.approx(np.mean(per_fold_auc))


@pytest.mark.parametrize("column", ["pooled", "fold_mean"])
def test_sort_by_a_figure(tree: dict, capsys: pytest.CaptureFixture, column: str) -> None:
    table = rows(tree, capsys, "--sort", column)
    values = [r[column] for r in table]
    known = [v for v in values if v is not None]
    assert known == sorted(known, reverse=True) and len(set(known)) > 3
    assert values == known + [None] * (len(values) - len(known))  # missing figures last
    if column == "pooled":  # the console table follows the same order
        text, _ = run(tree, capsys, "--sort", column)
        body = [l for l in text.splitlines()[2:] if not l.startswith(("*", "note:", "page:", "disk:"))]
        assert [l.split()[0] for l in body] == [r["run"] for r in table]
        assert all(r[column] is None or f"{r[column]:.4f}" in l for r, l in zip(table, body))


def test_sort_by_text_column_ascends(tree: dict, capsys: pytest.CaptureFixture) -> None:
    members = [r["member"] for r in rows(tree, capsys, "--sort", "member")]
    assert members == sorted(members)


def test_unknown_sort_column_is_one_line_exit_2(tree: dict, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        run(tree, capsys, "--sort", "mAP")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: --sort: unknown column 'mAP'")
    assert "fold_mean" in err and "pooled" in err


def test_diff_shows_the_differing_key_and_the_figures(tree: dict, capsys: pytest.CaptureFixture) -> None:
    text, _ = run(tree, capsys, "--diff", "base", "big")
    section = text[text.index("diff base vs big"):]
    assert re.search(r"^yolo\s+epochs\s+12\s+30$", section, re.M)
    base_yolo = next(r for r in tree["rows"] if (r["run"], r["member"]) == ("base", "yolo"))
    assert re.search(rf"^yolo\s+pooled OOF mAP@0.4\s+{base_yolo['pooled']:.4f}\s+0.2000$", section, re.M)
    assert re.search(r"^yolo@s640\s+pooled OOF mAP@0.4\s+0.3100\s+0.4500$", section, re.M)
    assert re.search(r"^classifier\s+present\s+absent\s+yes$", section, re.M)
    assert re.search(r"^yolo-yolo@s640\+classifier\s+nested OOF mAP@0.4\s+-\s+0.4600$", section, re.M)
    assert not re.search(r"^yolo\s+(imgsz|workers)\s", section, re.M)  # equal, or where it ran
    lines = json.loads(run(tree, capsys, "--json", "--diff", "base", "big")[0])["diff"]
    assert {"member": "yolo", "what": "epochs", "a": "12", "b": "30"} in lines
    page = (tree["root"] / "reports" / "index.html").read_text()
    assert "Diff: base vs big" in page and "<td>epochs</td><td>12</td><td>30</td>" in page


def test_diff_of_an_unknown_run_names_the_runs(tree: dict, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        run(tree, capsys, "--diff", "base", "nope")
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "'nope'" in err and "base, big" in err


def test_html_page_is_offline_and_escaped(tree: dict, capsys: pytest.CaptureFixture) -> None:
    path = tree["root"] / "pages" / "runs.html"
    main(["--runs-dir", str(tree["runs"]), "--html", str(path)])
    assert capsys.readouterr().out.splitlines()[-1] == f"page: {path}"
    page = path.read_text()
    for name in ("base", "big", "yolo@s640", "yolo-yolo@s640+classifier", "computed now", "figure to trust"):
        assert name in page
    assert "odd&lt;i&gt;run" in page and ODD not in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert not [p for p in path.parent.iterdir() if p.name != "runs.html"]  # atomic: no temp file left


def test_no_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--runs-dir", str(tmp_path / "runs"), "--html", str(tmp_path / "index.html")])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"no runs in {tmp_path / 'runs'}/"
    assert (tmp_path / "index.html").is_file()


def test_levers_refuse_a_bad_lever_family_or_run_before_any_make(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/levers.py: an unknown lever, a family that is no detector, a run without that member: one line, exit 2,
    before the first make (which would train for minutes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("levers", Path(__file__).resolve().parents[1] / "bench" / "levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    monkeypatch.setattr(levers, "make", lambda *a: pytest.fail(f"make {a} ran"))
    monkeypatch.setattr(levers, "REPO", tmp_path)
    (tmp_path / "runs" / "demo" / "effdet").mkdir(parents=True)
    for argv, words in ((["--only", "tta,sle"], "--only: sle: not a lever"),
                        (["--family", "classifier"], "--family: 'classifier' is not a detector"),
                        (["--name", "nothing"], "no effdet member in this run")):
        with pytest.raises(SystemExit) as e:
            levers.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_the_ablation_of_a_run_is_shown(tree: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """bench/levers.py's ablation.json / ablation.md of a run: `make runs` prints the table and its page shows it
    (every figure a nested one; a missing figure is '-')."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("levers", Path(__file__).resolve().parents[1] / "bench" / "levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    runs = shutil.copytree(tree["runs"], tmp_path / "runs")
    rows_ = [{"lever": "none", "member": "yolo", "what": "as it is", "fold_mean": 0.19, "test": None,
              "ensemble": 0.46, "ensemble_instead": None, "seconds": None},
             {"lever": "tta", "member": "yolo@tta", "what": "multi-scale <TTA>", "fold_mean": 0.2012, "test": 0.3,
              "ensemble": 0.4711, "ensemble_instead": 0.4655, "seconds": 61}]
    write_json({"run": "big", "family": "yolo", "rows": rows_}, runs / "big" / "ablation.json")
    table = levers.ablation_markdown(rows_, ["yolo", "yolo@s640"])
    (runs / "big" / "ablation.md").write_text(table + "\n")
    assert "| tta | yolo@tta | 0.2012 | 0.4600 | 0.4711 | 0.4655 | 0.3000 | 61 |" in table
    main(["--runs-dir", str(runs), "--html", str(tmp_path / "index.html")])
    out = capsys.readouterr().out
    assert "ablation of run big (bench/levers.py; nested OOF figures):\n" + table in out
    page = (tmp_path / "index.html").read_text()
    assert "Ablation: the winners' levers on big" in page and "multi-scale &lt;TTA&gt;" in page
    assert "<td>0.4711</td><td>0.4655</td><td>0.3000</td><td>61</td>" in page
