"""Presets: a named bundle under options given beside it, recorded value by value in config.yaml."""

import pytest

from zotune.errors import UserError
from zotune.recipe import config as cfg
from zotune.recipe import presets


def test_a_preset_sets_run_fields_and_method_options():
    config = cfg.from_mapping({"preset": "mezo-paper"})
    assert (config.method, config.batch_size, config.options.lr_zo) == ("mezo", 16, 1e-6)
    assert config.to_dict()["preset"] == "mezo-paper"


def test_options_given_beside_a_preset_win():
    config = cfg.from_mapping({"preset": "mezo-paper", "lr_zo": "1e-4", "batch_size": 4})
    assert (config.batch_size, config.options.lr_zo, config.options.eps) == (4, 1e-4, 1e-3)


def test_a_saved_config_reads_the_same_after_the_preset_changes(monkeypatch):
    saved = cfg.from_mapping({"preset": "mezo-paper"}).to_dict()
    changed = presets.Preset("mezo-paper", dict(method="mezo", lr_zo=1.0), "changed", "a test")
    monkeypatch.setitem(presets.PRESETS, "mezo-paper", changed)
    assert cfg.from_mapping(saved).options.lr_zo == 1e-6


def test_bad_presets_are_one_line_errors():
    with pytest.raises(UserError, match="did you mean 'mezo-paper'"):
        cfg.from_mapping({"preset": "mezo-papers"})
    with pytest.raises(UserError, match="a mezo preset, not one for --method hzo"):
        cfg.from_mapping({"preset": "mezo-paper", "method": "hzo"})


def test_every_preset_builds_and_names_its_source():
    for name, preset in presets.PRESETS.items():
        config = cfg.from_mapping({"preset": name})
        assert config.method == preset.values["method"] and preset.source
        assert all(config.to_dict()[key] == value for key, value in preset.values.items())
