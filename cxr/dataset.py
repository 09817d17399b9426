"""Facts about the VinBigData / VinDr-CXR task that every stage shares.

Nothing outside this module spells out a class name, the No-finding convention or a
file column list. Coordinate convention, everywhere on disk:

* Boxes are ``x_min, y_min, x_max, y_max`` in ORIGINAL image pixels (the DICOM's
  columns/rows), floats, with ``x_min < x_max`` and ``y_min < y_max``.
* Resized image sets (the Kaggle 256/512/1024 PNGs) are squashed to a square, so a
  box moves between original and resized pixels with one factor PER AXIS:
  ``x_resized = x_orig * resized_width / orig_width`` and likewise for y
  (:func:`cxr.boxes.to_resized`, :func:`cxr.boxes.to_original`).
* Meta CSVs follow Kaggle's resized sets: ``dim0`` is the original height and
  ``dim1`` the original width.
* "No finding" is class 14 and is always the box ``(0, 0, 1, 1)``: in labels an
  image with no finding box, in submissions the row ``14 p 0 0 1 1``.
"""
from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "No finding",
)
NUM_CLASSES = len(CLASS_NAMES)  # 15: what the metric averages over
NO_FINDING = 14
FINDING_CLASSES = tuple(range(NO_FINDING))  # the 14 classes a detector predicts
NO_FINDING_BOX = (0.0, 0.0, 1.0, 1.0)
CLASS_ID = {name: i for i, name in enumerate(CLASS_NAMES)}

IOU_THRESHOLD = 0.4  # the competition's matching threshold (a match needs IoU > 0.4)

BOX_COLUMNS = ["x_min", "y_min", "x_max", "y_max"]
# Kaggle train.csv; extra columns (e.g. width/height) are allowed and kept.
TRAIN_COLUMNS = ["image_id", "class_name", "class_id", "rad_id", *BOX_COLUMNS]
# PhysioNet VinDr-CXR annotations_test.csv (5-reader consensus, 22 local labels).
PHYSIONET_COLUMNS = ["image_id", "class_name", *BOX_COLUMNS]
# Kaggle resized-PNG meta files.
META_COLUMNS = ["image_id", "dim0", "dim1"]
# The one prediction format every model writes and the ensemble reads.
PREDICTION_COLUMNS = ["image_id", "class_id", "score", *BOX_COLUMNS]
SUBMISSION_COLUMNS = ["image_id", "PredictionString"]
FOLD_COLUMNS = ["image_id", "fold"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dicom", ".dcm")
