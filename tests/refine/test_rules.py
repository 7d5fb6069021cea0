"""Each refinement rule is one function, and every place that checks it agrees with it: "k below
the smallest set refined" (the experiment's check before training and the protocol's before
embedding), "the learned refinement needs a trained BGFormer at the features' width" (the
configuration's check, the protocol's and ``BGFormerRefinement.from_method``), and the
learned refinement's default k is the method's visual k."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bgf_pyg.checks import InputError
from bgf_pyg.config import configure
from bgf_pyg.experiment.build import build_run_method
from bgf_pyg.experiment.refinement import check_refine_request
from bgf_pyg.experiment.splits import config_splits
from bgf_pyg.models import METHODS, build_backbone, build_method
from bgf_pyg.refine import BGFormerRefinement
from bgf_pyg.refine.learned import check_trained_bgformer
from bgf_pyg.refine.protocol import check_refinements, settings

SMALLEST = 7
SIZES = {"test": 12, "gallery": None, "val": SMALLEST}


def refused(check) -> str | None:
    """The message of the ``ValueError`` (or ``InputError``) ``check()`` raises, else ``None``."""
    try:
        check()
    except (ValueError, InputError) as err:
        return str(err)
    return None


@pytest.mark.parametrize("k", [1, SMALLEST - 1, SMALLEST, SMALLEST + 5])
def test_k_below_the_smallest_set_is_one_rule(k):
    config = configure(method="plain", refine=["qe"], refine_k=[k], embedding_dim=8)
    splits = SimpleNamespace(**{name: None if size is None else range(size)
                                for name, size in SIZES.items()})
    before_training = refused(lambda: check_refine_request(config, None, splits))
    protocol = refused(lambda: check_refinements(["qe"], None, [k], None, [12, SMALLEST], True))
    assert (before_training is None) == (protocol is None) == (k < SMALLEST)
    if k >= SMALLEST:
        assert before_training.startswith(f"refine_k={k} (qe) must be smaller than the smallest "
                                          f"set refined ({SMALLEST} items)")
        assert protocol.startswith(f"k ({k}) must be smaller than the smallest set refined "
                                   f"({SMALLEST} items)")


def built(options: dict) -> torch.nn.Module:
    config = configure(embedding_dim=8, **options)
    return build_run_method(config, config_splits(config), torch.device("cpu"))[0]


@pytest.mark.parametrize("options", [
    *({"method": name} for name in METHODS),
    {"method": "bgformer", "graph_dim": 16, "graph_heads": 2},
])
def test_the_learned_refinement_is_refused_alike_everywhere(options):
    method = built(options)
    configured = refused(lambda: configure(embedding_dim=8, refine=["bgformer"], **options))
    model = refused(lambda: check_trained_bgformer(method))
    protocol = refused(lambda: check_refinements(["bgformer"], method, None, None, [50], True))
    from_method = refused(lambda: BGFormerRefinement.from_method(method))
    assert (configured is None) == (model is None) == (protocol is None) == (from_method is None)
    assert protocol == model == from_method


def test_the_learned_refinement_defaults_to_the_methods_visual_k():
    method = build_method("bgformer", build_backbone("smallcnn", 8), heads=2, k=6)
    assert method.visual_k == 6
    assert settings("bgformer", method, None, None) == [{"k": 6}]
    assert BGFormerRefinement.from_method(method).k == 6
