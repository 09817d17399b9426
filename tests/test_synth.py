"""The synthetic benchmark: Kaggle layout, real-statistics shape, determinism, and the full core on it."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest

from cxr.cli import main
from cxr.images import read_image
from cxr.labels import read_physionet_labels, read_sizes, read_train_labels
from cxr.synth import SynthConfig, generate, load_stats


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "synth.yaml":  # it names its own output folder
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_and_labels(synth_dir):
    for name in ("train.csv", "train_meta.csv", "test_meta.csv", "sample_submission.csv", "test_labels.csv"):
        assert (synth_dir / name).is_file(), name
    sizes = read_sizes(synth_dir / "train_meta.csv")
    labels = read_train_labels(synth_dir / "train.csv", sizes)  # validates boxes inside original sizes
    assert (sizes["width"] != sizes["height"]).mean() > 0.9  # non-square originals, like VinDr
    assert sizes["width"].between(800, 3500).all()
    assert (labels.groupby("image_id")["rad_id"].nunique() == 3).all()
    normal_share = (labels.groupby("image_id")["class_id"].min() == 14).mean()
    assert abs(normal_share - load_stats()["normal_share"]) < 0.1
    images = sorted(p.stem for p in (synth_dir / "train").glob("*.png"))
    assert images == sorted(sizes["image_id"])
    assert read_image(synth_dir / "train" / f"{images[0]}.png").shape == (128, 128)
    test = read_physionet_labels(synth_dir / "test_labels.csv")
    assert set(test["image_id"]) == set(read_sizes(synth_dir / "test_meta.csv")["image_id"])


def test_readers_disagree(synth_dir):
    labels = read_train_labels(synth_dir / "train.csv")
    findings = labels[labels["class_id"] != 14]
    per_reader = findings.groupby(["image_id", "rad_id"]).size().unstack(fill_value=0)
    assert (per_reader.nunique(axis=1) > 1).mean() > 0.3  # readers often draw different numbers of boxes


def test_findings_are_visible(synth_dir):
    """Inside a finding box the image differs from the same place on normal images."""
    sizes = read_sizes(synth_dir / "test_meta.csv").set_index("image_id")
    test = read_physionet_labels(synth_dir / "test_labels.csv")
    normal_ids = test.loc[test["class_id"] == 14, "image_id"].tolist()
    normal = np.mean([read_image(synth_dir / "test" / f"{i}.png").astype(float) for i in normal_ids], axis=0)
    diffs = []
    for r in test[test["class_id"].isin([0, 3, 8])].itertuples():
        w, h = sizes.loc[r.image_id, ["width", "height"]]
        x0, x1 = int(r.x_min / w * 128), int(np.ceil(r.x_max / w * 128))
        y0, y1 = int(r.y_min / h * 128), int(np.ceil(r.y_max / h * 128))
        img = read_image(synth_dir / "test" / f"{r.image_id}.png").astype(float)
        diffs.append(img[y0:y1, x0:x1].mean() - normal[y0:y1, x0:x1].mean())
    assert np.median(diffs) > 10  # bright findings are brighter than normal anatomy


def test_deterministic(tmp_path):
    a = generate(SynthConfig(out=str(tmp_path / "a"), n_train=12, n_test=4, seed=5))
    b = generate(SynthConfig(out=str(tmp_path / "b"), n_train=12, n_test=4, seed=5))
    c = generate(SynthConfig(out=str(tmp_path / "c"), n_train=12, n_test=4, seed=6))
    assert digest(a) == digest(b) != digest(c)


def test_core_pipeline_on_synth(synth_dir, tmp_path, capsys):
    """folds -> prior baseline (OOF + test) -> evaluate -> submission -> check, through the CLI."""
    d = synth_dir
    main(["folds", "--labels", str(d / "train.csv"), "--n-folds", "3", "--seed", "0", "--out", str(tmp_path / "folds.csv")])
    main(["baseline", "--labels", str(d / "train.csv"), "--train-sizes", str(d / "train_meta.csv"),
          "--folds", str(tmp_path / "folds.csv"), "--out", str(tmp_path / "oof.csv")])
    main(["baseline", "--labels", str(d / "train.csv"), "--train-sizes", str(d / "train_meta.csv"),
          "--sizes", str(d / "test_meta.csv"), "--out", str(tmp_path / "test.csv")])
    capsys.readouterr()
    main(["evaluate", "--labels", str(d / "train.csv"), "--submission", str(tmp_path / "oof.csv"),
          "--folds", str(tmp_path / "folds.csv"), "--fold", "0", "--json"])
    oof = json.loads(capsys.readouterr().out)
    main(["submission", "--predictions", str(tmp_path / "test.csv"), "--sample", str(d / "sample_submission.csv"),
          "--sizes", str(d / "test_meta.csv"), "--out", str(tmp_path / "sub.csv")])
    capsys.readouterr()
    main(["evaluate", "--labels", str(d / "test_labels.csv"), "--submission", str(tmp_path / "sub.csv"), "--coco",
          "--json"])
    test = json.loads(capsys.readouterr().out)
    print(f"\nprior-box baseline on synth: OOF fold 0 mAP {oof['map']:.4f}, test mAP {test['map']:.4f}")
    for r in (oof, test):
        assert 0.01 < r["map"] < 0.3 and r["ap"]["14"] > 0.5
    assert {"coco_ap", "coco_ap50"} <= set(test)
    sub = pd.read_csv(tmp_path / "sub.csv")
    assert len(sub) == len(pd.read_csv(d / "sample_submission.csv"))


def test_bad_settings_are_one_line(tmp_path, capsys):
    for flags, message in ((["--size", "0"], "cxr synth: size must be at least 16 pixels, got 0"),
                           (["--n-train", "0"], "cxr synth: n_train must be at least 1, got 0")):
        with pytest.raises(SystemExit) as e:
            main(["synth", "--out", str(tmp_path / "s"), *flags])
        assert e.value.code == 2 and capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "s").exists()


def test_synthetic_readers_follow_their_real_figures(tmp_path):
    """The simulated readers are the real ones: the same sets read the abnormal images, and the readers who
    agree more (R9 over R8) and stray more (R9 over R8) in train.csv do so in the synthetic labels too."""
    from cxr.fusion import fuse_readers
    from cxr.labels import read_train_labels
    from cxr.synth import load_stats, reader_stats

    out = generate(SynthConfig(out=str(tmp_path / "s"), n_train=900, n_test=1, size=32, seed=1, stray_boxes=0.5))
    labels = read_train_labels(out / "train.csv")
    figures, triples = reader_stats(labels, fuse_readers(labels))
    real = load_stats()
    assert triples["abnormal"]["R10,R8,R9"] > 0.85 and real["reader_triples"]["abnormal"]["R10,R8,R9"] > 0.9
    assert set(triples["normal"]) <= set(real["reader_triples"]["normal"])

    def agreement(f):
        return sum(v[0] for v in f["agreement"].values()) / sum(v[1] for v in f["agreement"].values())

    for source in (real["reader_figures"], figures):
        assert agreement(source["R9"]) > agreement(source["R10"]) > agreement(source["R8"]), source
        assert source["R9"]["stray"] > source["R8"]["stray"], source
    assert all(figures[r]["normal_share"] == 1.0 for r in ("R1", "R3", "R4", "R5", "R6", "R7") if r in figures)


def test_reader_stats_say_what_the_real_labels_say(real_labels):
    """``compute_stats`` on the real train.csv gives the committed vindr_stats.json, and its per-reader figures
    agree with a direct pandas count."""
    import json

    from conftest import TRAIN_INFO, real
    from cxr.labels import read_sizes
    from cxr.synth import STATS_PATH, compute_stats

    stats = compute_stats(real_labels, read_sizes(real(TRAIN_INFO)))
    assert json.loads(json.dumps(stats)) == json.loads(STATS_PATH.read_text())
    reads = real_labels.drop_duplicates(["image_id", "rad_id"])
    abnormal = set(real_labels.loc[real_labels["class_id"] != 14, "image_id"])
    for r, f in stats["reader_figures"].items():
        mine = reads[reads["rad_id"] == r]
        assert f["images"] == len(mine)
        assert abs(f["normal_share"] - (1 - mine["image_id"].isin(abnormal).mean())) < 1e-5
    r9 = real_labels[(real_labels["rad_id"] == "R9") & (real_labels["class_id"] == 3)]["image_id"]
    co = real_labels[(real_labels["rad_id"] != "R9") & (real_labels["class_id"] == 3)
                     & real_labels["image_id"].isin(reads.loc[reads["rad_id"] == "R9", "image_id"])]["image_id"]
    assert stats["reader_figures"]["R9"]["agreement"]["3"] == [len(set(co) & set(r9)), len(set(co))]
    triples = reads.groupby("image_id")["rad_id"].agg(lambda r: ",".join(sorted(r)))
    abnormal_triples = triples[triples.index.isin(abnormal)].value_counts(normalize=True)
    assert abs(stats["reader_triples"]["abnormal"]["R10,R8,R9"] - abnormal_triples["R10,R8,R9"]) < 1e-6


def test_the_readme_shows_the_committed_reader_table():
    """The README's per-reader table is ``cxr stats --readers`` of the committed stats, as printed."""
    from pathlib import Path

    from cxr.synth import reader_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = readme.split("<!-- readers: cxr stats --readers -->\n", 1)[1].split("\n<!-- /readers -->", 1)[0]
    assert shown == reader_table(load_stats())


def test_stats_without_labels_is_one_line_exit_2(capsys):
    """``cxr stats`` needs --labels and --sizes unless it only prints the reader table."""
    with pytest.raises(SystemExit) as e:
        main(["stats", "--out", "unused.json"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "give --labels and --sizes" in err and len(err.strip().splitlines()) == 1, err
