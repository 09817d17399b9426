"""The shared model plumbing: squashed-image boxes back to original pixels, flip TTA, WBF of tables, Lite0 weights."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import timm

from cxr.data import DataFolder
from cxr.wbf import flip_boxes, fuse_predictions
from models.common import load_efficientnet_lite0, predict_split

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
