"""A relaunch of an existing run continues it only when its config changes nothing but safe keys."""

from __future__ import annotations

import pytest

from raylm.configs.loader import load_config
from raylm.errors import UserError
from raylm.launcher.resume import differing_keys, relaunch_config


def test_the_same_config_differs_nowhere():
    assert differing_keys(load_config("tiny", ["name=x"]), load_config("tiny", ["name=x"])) == []


def test_stage_keys_are_named_by_position():
    saved = load_config("tiny", ["name=x"])
    assert differing_keys(saved, load_config("tiny", ["name=x", "stages.1.optim.lr=0.5", "model.d_model=64"])) == [
        "model.d_model", "stages.1.optim.lr"]


def test_safe_changes_are_taken_and_unsafe_ones_refused_with_their_keys():
    saved = load_config("tiny", ["name=x"])
    more_steps = load_config("tiny", ["name=x", "train.max_steps=90", "cluster.num_workers=4"])
    assert relaunch_config(saved, more_steps).train.max_steps == 90
    with pytest.raises(UserError, match=r"run .x. exists with another config \(model.n_layer, optim.lr differ"):
        relaunch_config(saved, load_config("tiny", ["name=x", "model.n_layer=2", "optim.lr=0.1"]))
