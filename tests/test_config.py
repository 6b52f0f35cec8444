"""Study-wide overrides: ``$VQHPS_SET`` (what ``reproduce --set`` sets) reaches every ``load_config``,
typed like ``--set``, and a bad key stops a reproduction before it writes anything."""
from __future__ import annotations

import pytest

from vqhps.config import STUDY_OVERRIDES_ENV, load_config, parse_overrides
from vqhps.reproduce import reproduce


def test_study_overrides_reach_every_config_and_explicit_ones_win(monkeypatch):
    monkeypatch.setenv(STUDY_OVERRIDES_ENV, "vqhps.backbone=resnet50 vqhps.backbone_weights=none vqhps.lr=2e-4")
    cfg = load_config("smoke")
    assert (cfg.vqhps.backbone, cfg.vqhps.backbone_weights, cfg.vqhps.lr) == ("resnet50", None, 2e-4)
    assert load_config("smoke", **{"vqhps.lr": 5e-4}).vqhps.lr == 5e-4
    monkeypatch.delenv(STUDY_OVERRIDES_ENV)
    assert load_config("smoke").vqhps.backbone == "efficientnet_lite0"  # the profile's own choice again


def test_overrides_are_typed_and_checked():
    assert parse_overrides(["vqhps.backbone=efficientnet_lite0", "vqhps.warmup_steps=1_000"]) == {
        "vqhps.backbone": "efficientnet_lite0", "vqhps.warmup_steps": 1000}
    with pytest.raises(ValueError, match="choose one of"):
        parse_overrides(["vqhps.backbone=vit"])


def test_a_bad_override_stops_a_reproduction_before_it_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("VQHPS_RESULTS_DIR", str(tmp_path / "results"))
    with pytest.raises(ValueError, match="has no field 'backbone_name'"):
        reproduce("smoke", only=["00"], overrides=["vqhps.backbone_name=resnet50"])
    assert not (tmp_path / "results").exists()
