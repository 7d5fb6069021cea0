"""Attacks on ``Config.replace`` and ``from_checkpoint``: a replaced configuration equals the one
configured from scratch with the same options (no stale derived value: ``proxy_lr``, ``out``, a
method's defaults), also when it was read back from a checkpoint; bad changes name the field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bgf_pyg.checks import InputError
from bgf_pyg.config import RESUMABLE, Config, checkpoint_config, configure, from_checkpoint
from tests.strategies import bounded

METHODS = ("plain", "bgformer", "intra-batch", "proxygml")
#: Options every method takes, with a few values each (the method itself drawn separately).
SHARED = {"seed": st.integers(0, 2**32 - 1), "lr": st.sampled_from([1e-4, 3e-4, 1e-3, 0.05]),
          "epochs": st.integers(1, 50), "embedding_dim": st.sampled_from([8, 64, 512]),
          "select_on": st.sampled_from(["val", "last"])}
options = st.fixed_dictionaries({"method": st.sampled_from(METHODS)}, optional=SHARED)
#: What a checkpoint stores: not the options a resumed run may change (``epochs``).
stored = st.fixed_dictionaries({"method": st.sampled_from(METHODS)},
                               optional={k: v for k, v in SHARED.items() if k not in RESUMABLE})
changes = st.fixed_dictionaries({}, optional={"method": st.sampled_from(METHODS), **SHARED})


def stored_options(config: Config) -> dict:
    return {k: v for k, v in config.options().items() if k not in RESUMABLE}


@bounded(25)
@given(options, changes)
def test_replace_equals_configuring_afresh(before, change):
    assert configure(**before).replace(**change) == configure(**{**before, **change})


@bounded(25)
@given(stored, changes)
def test_a_checkpoints_configuration_replaces_like_the_original(before, change):
    """Read back from a checkpoint (every option resolved and stored), ``replace`` re-derives
    ``proxy_lr``, ``val_classes``, ``out`` and a new method's defaults instead of keeping the
    stored ones, and a new method's scopes do not trip on the stored values."""
    restored = from_checkpoint(checkpoint_config(configure(**before)))
    assert stored_options(restored) == stored_options(configure(**before))
    assert restored.replace(**change) == configure(**{**before, **change})


def test_derived_values_follow_the_change():
    config = configure(method="proxygml", lr=1e-3)
    changed = config.replace(lr=1e-2, seed=4)
    assert changed.proxy_lr == pytest.approx(100 * 1e-2) and changed.out.endswith("-s4")
    assert configure(method="bgformer").replace(method="intra-batch").graph_layers == \
        configure(method="intra-batch").graph_layers


def test_a_change_of_dataset_re_derives_its_defaults_and_none_unsets():
    emoji = configure(dataset="emoji", data_root="/data/emoji", method="bgformer")
    assert emoji.replace(dataset="cub") == configure(dataset="cub", data_root="/data/emoji",
                                                     method="bgformer")
    # data_root applies to image datasets only: None takes it back to its default (unset)
    assert emoji.replace(dataset="demo", data_root=None) == configure(method="bgformer")
    assert configure(lr=0.05).replace(lr=None).lr == configure().lr


@pytest.mark.parametrize("change,fragment", [
    ({"learning_rate": 0.1}, "unknown option(s) 'learning_rate'"),
    ({"given": {}}, "unknown option(s) 'given'"),
    ({"lr": "0.1"}, "lr must be a number (float)"),
    ({"epochs": 2.0}, "epochs must be an int"),
    ({"epochs": True}, "epochs must be a single int"),
    ({"proxies_per_class": 3}, "proxies_per_class has no effect here (method plain)"),
])
def test_bad_changes_name_the_field(change, fragment):
    with pytest.raises(InputError) as err:
        configure(method="plain").replace(**change)
    assert fragment in str(err.value)


def test_a_change_of_method_drops_nothing_silently():
    """An option the new method ignores was given: refused, not dropped."""
    with pytest.raises(InputError, match="proxies_per_class has no effect here"):
        configure(method="proxygml", proxies_per_class=3).replace(method="plain")


def test_a_config_built_directly_is_not_replaced_with_defaults():
    """``Config(lr=...)`` is not resolved and records nothing given: ``replace`` would have
    dropped its values for the defaults; it says how to build one instead."""
    with pytest.raises(InputError, match=r"configure\(\.\.\.\)"):
        Config(lr=0.5).replace(seed=1)
