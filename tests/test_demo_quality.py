"""Every detector of the model table, demo profile, fold 0 of the `make demo` data, through the real
entry point: above the prior-box floor, with real finding boxes of the right classes."""
from __future__ import annotations

import pytest

import models
from tests.conftest import fold0_against_prior

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.mark.slow
@pytest.mark.parametrize("model", models.names("detector"))
def test_demo_profile_beats_prior_boxes(model, tmp_path_factory, figures):
    ours, prior, minutes, found = fold0_against_prior(model, tmp_path_factory.mktemp(f"{model}_demo"))
    figures(f"{model} demo fold 0: OOF mAP@0.4 {ours:.4f} vs prior boxes {prior:.4f} ({minutes:.1f} min); "
            f"finding classes with AP > 0: {found}")
    assert ours > prior
    # it finds boxes, not only the No-finding row, and of the right classes: Aortic enlargement (0) and
    # Cardiomegaly (3), the demo's large frequent findings (a class-id mix-up would lose them)
    assert {0, 3} <= set(found)
