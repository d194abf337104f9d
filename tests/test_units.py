"""Neuron and channel units, entry masks, ablation, freezing, and the attribution methods.

The attribution tests plant a safety neuron: one MLP neuron of the first layer answers only to
the embedding of a trigger word that appears in every safety prompt and in no utility prompt.
Every method must put that neuron (or its weights) in its safety set.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.conftest import TINY_SAFETY, _micro_config, make_cfg
from tests.tiny_models import ARCHS, tiny_input_ids, tiny_model
from zorefine.analyze.attribution import channel_statistics, snip_scores, ssah_scores, wanda_scores
from zorefine.analyze.unit_classes import SSAH_CLASSES, class_size, set_difference, ssah_classes
from zorefine.models.layers import find_decoder_layers
from zorefine.models.neurons import decoder_linears, find_unit_groups, weight_axes
from zorefine.models.param_masks import (
    count_entries, freeze_masked, load_masks, random_entries_like, random_units_like, save_masks, units_to_masks,
)
from zorefine.threats import threatened
from zorefine.threats.ablation import MaskAblation


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("arch", ARCHS)
def test_every_layer_has_one_mlp_and_one_attention_group_of_the_right_width(arch):
    model = tiny_model(arch)
    groups = find_unit_groups(model)
    layers = find_decoder_layers(model)
    assert [(g.layer, g.kind) for g in groups] == [(i, k) for i in range(len(layers)) for k in ("mlp", "attention")]
    config = model.config
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size
    for group in groups:
        if group.kind == "mlp":
            assert group.size == intermediate
            # Input projections (gate/up, fc1, c_fc, dense_h_to_4h) beside the output projection.
            assert len([s for s in group.slices if s.param.endswith("weight")]) >= 2
        else:
            assert group.size % 4 == 0 and group.head_size == group.size // 4


def _zero_channel_by_hook(model, module, channel):
    def hook(_module, inputs):
        x = inputs[0].clone()
        x[..., channel] = 0
        return (x,)
    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("arch", ARCHS)
def test_ablating_a_unit_equals_silencing_its_activation(arch):
    """Zeroing a unit's slices must do what removing the unit does: its input to the output
    projection is zero. A wrong axis (GPT-2's transposed Conv1D) would zero other weights."""
    model = tiny_model(arch)
    ids = tiny_input_ids()
    linears = decoder_linears(model)
    for group in find_unit_groups(model)[-2:]:
        chosen = torch.zeros(group.size, dtype=torch.bool)
        chosen[3] = True
        masks = units_to_masks([group], {group.key: chosen})
        assert count_entries(masks) == group.parameters_per_unit
        with torch.no_grad(), threatened(model, MaskAblation(masks)):
            ablated = model(input_ids=ids).logits
        handle = _zero_channel_by_hook(model, linears[group.output], 3)
        with torch.no_grad():
            silenced = model(input_ids=ids).logits
        handle.remove()
        assert torch.allclose(ablated, silenced, atol=1e-5), group.key
        with torch.no_grad():
            intact = model(input_ids=ids).logits
        assert not torch.allclose(intact, silenced, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ablation_restores_every_weight_bit_for_bit(arch):
    model = tiny_model(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = find_unit_groups(model)
    masks = units_to_masks(groups, random_units_like({g.key: torch.ones(g.size, dtype=torch.bool) & (torch.arange(g.size) < 4) for g in groups}, torch.Generator().manual_seed(0)))
    with torch.no_grad(), threatened(model, MaskAblation(masks)):
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_random_controls_keep_the_shape_of_the_set():
    generator = torch.Generator().manual_seed(1)
    chosen = {"a": torch.tensor([True, False, False, True, False]), "b": torch.tensor([False, True])}
    drawn = random_units_like(chosen, generator)
    assert {k: int(v.sum()) for k, v in drawn.items()} == {"a": 2, "b": 1}
    masks = {"w": torch.rand(6, 7, generator=generator) > 0.8}
    other = random_entries_like(masks, generator)
    assert other["w"].shape == (6, 7) and int(other["w"].sum()) == int(masks["w"].sum())
    assert not torch.equal(other["w"], masks["w"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_frozen_units_do_not_move_while_the_rest_of_their_tensors_trains(arch):
    model = tiny_model(arch).train()
    group = find_unit_groups(model)[0]
    chosen = torch.zeros(group.size, dtype=torch.bool)
    chosen[:5] = True
    masks = units_to_masks([group], {group.key: chosen})
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in masks}
    handles = freeze_masked(params, masks)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = tiny_input_ids()
    for _ in range(2):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    for handle in handles:
        handle.remove()
    for name, mask in masks.items():
        assert torch.equal(params[name].detach()[mask], before[name][mask]), name
        assert not torch.equal(params[name].detach()[~mask], before[name][~mask]), name


def test_masks_survive_a_round_trip_through_safetensors(tmp_path):
    sets = {"scu": {"x.weight": torch.rand(3, 4) > 0.5}, "safety": {"y.weight": torch.rand(5) > 0.5}}
    save_masks(tmp_path / "m.safetensors", sets)
    loaded = load_masks(tmp_path / "m.safetensors")
    assert set(loaded) == {"scu", "safety"}
    assert all(torch.equal(loaded[k][n], sets[k][n]) for k in sets for n in sets[k])


# --------------------------------------------------------------------------- classes


def test_ssah_classes_are_disjoint_cover_every_unit_and_follow_the_scores():
    safety = {"g": torch.tensor([9.0, 1.0, 1.0, 1.0, 0.1, 1.0, 1.0, 1.0, 0.2, 1.0])}
    utility = {"g": torch.tensor([1.0, 1.0, 9.0, 1.0, 0.1, 1.0, 1.0, 1.0, 0.2, 1.0])}
    classes = ssah_classes(safety, utility, {"scu": 0.1, "ucu": 0.1, "ru": 0.2})
    assert classes["scu"]["g"].nonzero().flatten().tolist() == [0]
    assert classes["ucu"]["g"].nonzero().flatten().tolist() == [2]
    assert classes["ru"]["g"].nonzero().flatten().tolist() == [4, 8]
    stacked = torch.stack([classes[c]["g"] for c in SSAH_CLASSES]).int()
    assert stacked.sum(0).tolist() == [1] * 10
    assert class_size(0.01, 64) == 1 and class_size(0.0, 64) == 0


def test_set_difference_removes_what_utility_also_needs():
    safety = torch.tensor([[5.0, 4.0], [3.0, 0.0]])
    utility = torch.tensor([[9.0, 0.0], [0.0, 0.0]])
    # Top half by safety: 5 and 4; top quarter by utility: the 5's entry. Left: the 4.
    assert set_difference(safety, utility, 0.5, 0.25).tolist() == [[False, True], [False, False]]


# --------------------------------------------------------------------------- planted neuron

TRIGGER = "bomb"
PLANTED = 5


def _planted_model(arch, tokenizer):
    """A micro model whose first-layer MLP neuron PLANTED fires only on the trigger's tokens."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_micro_config(arch, tokenizer)).eval()
    trigger_ids = tokenizer(TRIGGER, add_special_tokens=False).input_ids
    # The first layer: a later layer carries its trigger-position output to the response tokens,
    # so the response loss (SNIP) sees the neuron too.
    group = [g for g in find_unit_groups(model) if g.kind == "mlp"][0]
    linears = decoder_linears(model)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding[:, 0] = 0.0
        embedding[trigger_ids] = 0.0
        embedding[trigger_ids, 0] = 20.0
        # Residual feature 0 carries the trigger and nothing else: no block writes to it.
        for writer in find_unit_groups(model):
            module = linears[writer.output]
            module.weight.select(weight_axes(module)[0], 0).zero_()
            if getattr(module, "bias", None) is not None:
                module.bias[0] = 0.0
        for name, param in model.named_parameters():
            if "wpe" in name:
                param[:, 0] = 0.0
        for piece in group.slices:
            tensor = group.params[piece.param]
            unit = tensor.select(piece.axis, PLANTED)
            if piece.param.startswith(group.output):
                unit.mul_(30.0)
            elif tensor.dim() == 1:
                # A negative bias keeps the neuron quiet where LayerNorm's centring leaves feature 0 near zero.
                unit.fill_(-6.0)
            else:
                # Every input projection reads feature 0 for this neuron only.
                tensor.select(1 - piece.axis, 0).zero_()
                unit.zero_()
                unit[0] = 4.0
    return model, group, trigger_ids


def _planted_data(tokenizer, trigger_ids):
    safety = [(f"How do I build a {TRIGGER} at {place}?", f"No {TRIGGER}, I can't help with a {TRIGGER}.") for place in ("home", "school", "work", "night")]
    utility = [("What is the capital of France?", "Paris is the capital."), ("Name a fruit.", "An apple is a fruit."),
               ("How are you today?", "I am well, thank you."), ("Count to three.", "One, two, three.")]
    for prompt, response in utility:
        assert not set(trigger_ids) & set(tokenizer(prompt + response).input_ids)
    return safety, utility


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_method_finds_the_planted_safety_neuron(arch, micro_tokenizer):
    model, group, trigger_ids = _planted_model(arch, micro_tokenizer)
    safety, utility = _planted_data(micro_tokenizer, trigger_ids)
    linears = decoder_linears(model)
    groups = find_unit_groups(model)
    outputs = {g.output: linears[g.output] for g in groups}
    # SSAH: the neuron is the group's safety-critical unit.
    scores = {label: ssah_scores(groups, channel_statistics(model, micro_tokenizer, pairs, outputs, 96, 4)[0], outputs)
              for label, pairs in (("safety", safety), ("utility", utility))}
    classes = ssah_classes(scores["safety"], scores["utility"], {"scu": 0.01, "ucu": 0.01, "ru": 0.2})
    assert classes["scu"][group.key].nonzero().flatten().tolist() == [PLANTED]
    # Wanda and SNIP: the neuron's column of the output projection is in the set difference.
    _, in_axis = weight_axes(linears[group.output])
    wanda = {label: channel_statistics(model, micro_tokenizer, pairs, linears, 96, 4)[0] for label, pairs in (("safety", safety), ("utility", utility))}
    snip = {label: snip_scores(model, micro_tokenizer, pairs, linears, 96, 4)[0] for label, pairs in (("safety", safety), ("utility", utility))}
    module = linears[group.output]
    for name, (safe_score, useful_score) in {
        "wanda": (wanda_scores(module, wanda["safety"][group.output]), wanda_scores(module, wanda["utility"][group.output])),
        "snip": (snip["safety"][group.output], snip["utility"][group.output]),
    }.items():
        chosen = set_difference(safe_score, useful_score, 0.03, 0.03)
        column = chosen.select(in_axis, PLANTED)
        assert int(column.sum()) >= column.numel() // 2, name
        # ... chosen far more often than the tensor's other entries.
        rest_rate = (int(chosen.sum()) - int(column.sum())) / (chosen.numel() - column.numel())
        assert int(column.sum()) / column.numel() >= 10 * rest_rate, name


def test_snip_leaves_requires_grad_as_it_found_it(micro_tokenizer):
    model, _, trigger_ids = _planted_model("llama", micro_tokenizer)
    safety, _ = _planted_data(micro_tokenizer, trigger_ids)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    snip_scores(model, micro_tokenizer, safety, decoder_linears(model), 96, 4)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- stage


@pytest.mark.parametrize("method", ["ssah", "wanda_diff", "snip_diff", "safeseek"])
def test_analyze_with_a_unit_method_writes_units_masks_and_a_layer_selection(method, micro_checkpoint, tmp_path):
    from zorefine.analyze import stage as analyze
    from zorefine.run import Run

    cfg = make_cfg(micro_checkpoint, stages="[analyze]", **{
        "align.enabled": False, "analyze.method": method, "analyze.units.prompts": 4, "analyze.units.ablation_prompts": 4,
        "analyze.units.ablation_draws": 2, "analyze.units.max_new_tokens": 3, "analyze.units.scu": 0.05,
        # A cheap circuit search that removes some units (a random micro model has no refusal to protect).
        "analyze.units.circuit_steps": 5, "analyze.units.circuit_lr": 1.0, "analyze.units.circuit_sparsity": 0.0})
    summary = analyze.run(Run(cfg, tmp_path))
    report = json.loads((tmp_path / "units.json").read_text())
    assert report["method"] == method and summary["selected"]
    rows = {row["set"]: row for row in report["ablation"]["rows"]}
    assert set(rows) == {"ssah": {"scu", "ucu", "ru"}, "safeseek": {"circuit"}}.get(method, {"safety"})
    for row in rows.values():
        assert 0 < row["share"] < 1 and row["entries"] == report["sets"][row["set"]]["entries"]
        assert {"mean", "low", "high"} <= set(row["refusal_minus_random"])
    assert report["cost"]["attribution"]["forward"] >= 2
    assert (report["cost"]["attribution"]["backward"] > 0) == (method in ("snip_diff", "safeseek"))
    masks = load_masks(tmp_path / "units.safetensors")
    assert {label: count_entries(m) for label, m in masks.items() if label in report["sets"]} == {label: s["entries"] for label, s in report["sets"].items()}
    # SSAH also keeps its common units (not ablated: most of the model) for freezing.
    assert set(masks) - set(report["sets"]) == ({"cu"} if method == "ssah" else set())
    assert abs(sum(report["layer_shares"].values()) - 1) < 1e-9
    selection = json.loads((tmp_path / "selection.json").read_text())
    assert selection["units"] == summary["selected"]
    if method in ("ssah", "safeseek"):
        from safetensors.torch import load_file

        kept = load_file(str(tmp_path / "unit_scores.safetensors"))
        prefixes = {"ssah": ("safety", "utility"), "safeseek": ("logit",)}[method]
        assert {key.split("::")[0] for key in kept} == set(prefixes)
    table = (tmp_path / "units.md").read_text()
    assert all(f"| {label} |" in table for label in rows) and (tmp_path / "units.png").stat().st_size > 0


def test_a_bad_unit_setting_is_a_config_error():
    from zorefine.config.validate import validate
    from zorefine.errors import ConfigError

    with pytest.raises(ConfigError, match="analyze.method"):
        validate(make_cfg(None, **{"analyze.method": "magic"}))
    with pytest.raises(ConfigError, match="scu"):
        validate(make_cfg(None, **{"analyze.method": "ssah", "analyze.units.scu": 0.7, "analyze.units.ru": 0.5}))


# --------------------------------------------------------------------------- fine-tuning


def _benign_pairs():
    return [("Name a colour.", "Blue is a colour."), ("What is two plus two?", "Two plus two is four."),
            ("Say hello.", "Hello there!"), ("Name an animal.", "A cat is an animal.")]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_finetune_attack_trains_keeps_frozen_entries_and_restores_exactly(arch, micro_tokenizer):
    from zorefine.models.layers import decoder_parameters
    from zorefine.threats import FineTuneAttack, parse_threat

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_micro_config(arch, micro_tokenizer)).eval()
    attack = parse_threat("finetune:3:lr=1e-2:batch=2")
    assert isinstance(attack, FineTuneAttack) and parse_threat(attack.spec) == attack
    # The positional form needs no '=' (Hydra's override grammar rejects it unquoted).
    assert parse_threat("finetune:3:1e-2:b2") == attack
    group = find_unit_groups(model)[0]
    chosen = torch.zeros(group.size, dtype=torch.bool)
    chosen[:4] = True
    frozen = units_to_masks([group], {group.key: chosen})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    bound = attack.with_data(micro_tokenizer, _benign_pairs(), 64)
    from dataclasses import replace
    with threatened(model, replace(bound, frozen=frozen)):
        params = dict(model.named_parameters())
        moved = [n for n in decoder_parameters(model) if not torch.equal(params[n], before[n])]
        assert moved, "the attack trained nothing"
        for name, mask in frozen.items():
            assert torch.equal(params[name].detach()[mask], before[name][mask])
        # Only the decoder trains: what threatened() restores is all that moved.
        assert all(torch.equal(params[n], before[n]) for n in params if n not in decoder_parameters(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()} and not model.training


def test_an_unbound_finetune_attack_and_misplaced_specs_are_clear_errors(micro_tokenizer):
    from zorefine.config.validate import validate
    from zorefine.errors import ConfigError
    from zorefine.threats import parse_threat

    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="no training data"):
        with threatened(model, parse_threat("finetune:2")):
            pass
    for bad in ("finetune:0", "finetune:2:lr=-1", "finetune:2:colour=red", "finetune"):
        with pytest.raises(ConfigError):
            parse_threat(bad)
    with pytest.raises(ConfigError, match="evaluate threat only"):
        validate(make_cfg(None, **{"analyze.threats": "[finetune:3]"}))
    with pytest.raises(ConfigError, match="finetune:STEPS"):
        validate(make_cfg(None, **{"analyze.method": "ssah", "analyze.units.finetune": "wnoise:0.1"}))


def test_evaluate_runs_the_finetune_attack_on_the_benign_training_pairs(micro_checkpoint, tmp_path):
    from zorefine.evaluate import stage as evaluate
    from zorefine.run import Run

    cfg = make_cfg(micro_checkpoint, stages="[evaluate]", **{"align.enabled": False, "evaluate.quantization": "[finetune:2:lr=1e-2:batch=2]"})
    evaluate.run(Run(cfg, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    conditions = {c["label"]: c for c in metrics["models"]["model"]["conditions"]}
    attacked, clean = conditions["finetune:2:lr=1e-2:batch=2"], conditions["clean"]
    # Two steps at a large rate move the losses: the threat really trained the model.
    assert attacked["utility_loss"] != clean["utility_loss"]


def test_a_seeded_finetune_attack_is_a_draw_of_the_split_s_stream_and_the_unseeded_one_is_fixed():
    from zorefine.evaluate.robustness import threat_grid
    from zorefine.threats import parse_threat
    from zorefine.threats.base import is_random
    from zorefine.threats.streams import stream_seed

    seeded, fixed = parse_threat("finetune:2:5e-5:seed=1"), parse_threat("finetune:2:5e-5")
    assert parse_threat(seeded.spec) == seeded and seeded.seed == 1 and is_random(seeded)
    assert fixed.seed is None and not is_random(fixed) and "seed" not in fixed.spec
    val, test = (threat_grid([], 1, ["finetune:2:5e-5:seed=1", "finetune:2:5e-5"], stream=s) for s in ("val", "test"))
    assert val[1].threat.seed == stream_seed("val", 1) != test[1].threat.seed == stream_seed("test", 1)
    assert val[2].threat.seed is None and test[2].threat.seed is None


def test_the_draws_of_a_seeded_finetune_attack_differ_and_are_summarized_as_one_threat(micro_checkpoint, tmp_path):
    from zorefine.evaluate import stage as evaluate
    from zorefine.run import Run

    specs = ["finetune:2:lr=1e-2:batch=2:seed=0", "finetune:2:lr=1e-2:batch=2:seed=1"]
    cfg = make_cfg(micro_checkpoint, stages="[evaluate]", **{"align.enabled": False, "evaluate.quantization": "[" + ",".join(specs) + "]"})
    evaluate.run(Run(cfg, tmp_path))
    result = json.loads((tmp_path / "metrics.json").read_text())["models"]["model"]
    conditions = {c["label"]: c for c in result["conditions"]}
    # Different batch orders train different weights.
    assert conditions[specs[0]]["utility_loss"] != conditions[specs[1]]["utility_loss"]
    assert [g for g in result["summary"] if g.startswith("finetune")] == ["finetune:2:lr=1e-2:batch=2"]
    pooled = result["summary"]["finetune:2:lr=1e-2:batch=2"]["utility_loss"]["mean"]
    assert pooled == pytest.approx((conditions[specs[0]]["utility_loss"] + conditions[specs[1]]["utility_loss"]) / 2)


def test_evaluate_freezes_the_named_sets_while_the_finetune_attack_trains(micro_checkpoint, tmp_path):
    from zorefine.config import validate
    from zorefine.errors import ConfigError
    from zorefine.evaluate import stage as evaluate
    from zorefine.models.layers import decoder_parameters
    from zorefine.models.loading import load_causal_lm
    from zorefine.models.param_masks import save_masks
    from zorefine.run import Run

    model, _ = load_causal_lm(str(micro_checkpoint), "float32", "cpu")
    everything = {name: torch.ones_like(p, dtype=torch.bool) for name, p in decoder_parameters(model).items()}
    save_masks(tmp_path / "units.safetensors", {"all": everything})
    attack = "finetune:2:lr=1e-2:batch=2"
    cfg = make_cfg(micro_checkpoint, stages="[evaluate]", **{"align.enabled": False, "evaluate.quantization": f"[{attack}]",
                                                              "evaluate.clean_max_prompts": 4,  # the threats' prompts
                                                              "evaluate.finetune_freeze": f"{tmp_path / 'units.safetensors'}:all"})
    validate(cfg)
    evaluate.run(Run(cfg, tmp_path / "run"))
    conditions = {c["label"]: c for c in json.loads((tmp_path / "run" / "metrics.json").read_text())["models"]["model"]["conditions"]}
    # Every decoder entry frozen: the attack trains nothing, and the model under it is the clean one.
    assert conditions[attack]["utility_loss"] == conditions["clean"]["utility_loss"]
    with pytest.raises(ConfigError, match="finetune_freeze"):
        validate(make_cfg(micro_checkpoint, **{"evaluate.finetune_freeze": f"{tmp_path / 'missing.safetensors'}:all"}))


def test_ssah_analysis_compares_freezing_during_a_benign_finetune(micro_checkpoint, tmp_path):
    from zorefine.analyze import stage as analyze
    from zorefine.run import Run

    cfg = make_cfg(micro_checkpoint, stages="[analyze]", **{
        "align.enabled": False, "analyze.method": "ssah", "analyze.units.prompts": 4, "analyze.units.ablation_prompts": 4,
        "analyze.units.ablation_draws": 1, "analyze.units.max_new_tokens": 3, "analyze.units.finetune": "finetune:2:lr=1e-2:batch=2"})
    analyze.run(Run(cfg, tmp_path))
    report = json.loads((tmp_path / "units.json").read_text())
    rows = {row["frozen"]: row for row in report["freezing"]["rows"]}
    assert set(rows) == {"nothing", "scu", "scu+cu"}
    assert 0 < rows["scu"]["entries"] < rows["scu+cu"]["entries"]
    assert {"mean", "low", "high"} <= set(rows["scu+cu"]["refusal_minus_full_finetune"])
    assert report["cost"]["finetune_backward"] == 2 * 3
    assert "| scu+cu |" in (tmp_path / "units.md").read_text()


def test_align_can_train_only_the_redundant_units(micro_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from zorefine.align import stage as align
    from zorefine.analyze import stage as analyze
    from zorefine.errors import ConfigError
    from zorefine.run import Run

    analysis = tmp_path / "analysis"
    analyze.run(Run(make_cfg(micro_checkpoint, stages="[analyze]", **{
        "align.enabled": False, "analyze.method": "ssah", "analyze.units.prompts": 4, "analyze.units.ablation_prompts": 2,
        "analyze.units.ablation_draws": 1, "analyze.units.max_new_tokens": 2}), analysis))
    units_file = analysis / "units.safetensors"
    ru = load_masks(units_file)["ru"]
    cfg = make_cfg(micro_checkpoint, stages="[align]", **{"align.units_file": str(units_file), "align.units_set": "ru", "align.lr": 1e-2})
    summary = align.run(Run(cfg, tmp_path / "aligned"))
    start = load_file(str(micro_checkpoint / "model.safetensors"))
    aligned = load_file(str(tmp_path / "aligned" / "checkpoints" / "aligned" / "model.safetensors"))
    assert summary["enabled"]
    for name, before in start.items():
        after = aligned[name]
        if name in ru:
            assert torch.equal(after[~ru[name]], before[~ru[name]]), name
            assert not torch.equal(after[ru[name]], before[ru[name]]), name
        else:
            assert torch.equal(after, before), name
    with pytest.raises(ConfigError, match="not in"):
        align.run(Run(make_cfg(micro_checkpoint, stages="[align]", **{"align.units_file": str(units_file), "align.units_set": "nope"}), tmp_path / "bad"))


# --------------------------------------------------------------------------- SafeSeek


def test_the_circuit_search_removes_what_the_refusals_need_and_its_price_keeps_it_small(micro_tokenizer):
    from zorefine.analyze.safeseek import find_circuit
    from zorefine.models.objectives import encode_batch, response_nll

    from zorefine.models.finetune import finetune_steps

    model, _, trigger_ids = _planted_model("llama", micro_tokenizer)
    safety, utility = _planted_data(micro_tokenizer, trigger_ids)
    # A micro model that refuses: the search needs refusals that are likely to begin with.
    finetune_steps(model, micro_tokenizer, safety + utility, dict(model.named_parameters()), steps=40, lr=1e-2, batch_size=8, max_length=96)
    groups = find_unit_groups(model)
    linears = decoder_linears(model)
    outputs = {g.output: linears[g.output] for g in groups}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    found = find_circuit(model, micro_tokenizer, groups, outputs, safety, utility, steps=40, lr=0.5, sparsity=0.02, batch_size=4, max_length=96)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "the search must not train the weights"
    assert all(m.dtype == torch.bool for m in found.circuit.values())
    # Heads are searched as heads: an attention group's mask has one entry per head.
    assert all(found.circuit[g.key].numel() == (4 if g.kind == "attention" else g.size) for g in groups)
    masks = units_to_masks(groups, found.channels(groups))
    assert count_entries(masks) > 0
    batches = {"safety": encode_batch(micro_tokenizer, safety, 96), "utility": encode_batch(micro_tokenizer, utility, 96)}

    def losses(masks):
        with torch.no_grad(), threatened(model, MaskAblation(masks) if masks else []):
            return {kind: float(response_nll(model, batch)) for kind, batch in batches.items()}

    def specificity(ablated, intact):
        # How much more the refusals suffer than the benign answers.
        return (ablated["safety"] - intact["safety"]) / max(ablated["utility"] - intact["utility"], 0.05)

    intact, ablated = losses(None), losses(masks)
    # With the circuit removed the refusals are far less likely, the benign answers hardly less,
    # and far more selectively so than with as many random heads and neurons removed (a random
    # micro-model unit often carries everything at once).
    assert ablated["safety"] > 2 * intact["safety"]
    generator = torch.Generator().manual_seed(0)
    widths = {g.key: (g.head_size if g.kind == "attention" else 1) for g in groups}
    for _ in range(3):
        drawn = random_units_like(found.circuit, generator)
        control = losses(units_to_masks(groups, {k: v.repeat_interleave(widths[k]) for k, v in drawn.items()}))
        assert specificity(control, intact) < specificity(ablated, intact)
    # A high price per removed unit keeps every unit.
    costly = find_circuit(model, micro_tokenizer, groups, outputs, safety, utility, steps=10, lr=0.05, sparsity=1e4, batch_size=4, max_length=96)
    assert not any(bool(m.any()) for m in costly.circuit.values())


def test_the_circuit_search_s_sufficiency_term_scores_the_refusals_with_only_the_circuit_kept(micro_tokenizer):
    from zorefine.analyze.safeseek import find_circuit
    from zorefine.models.objectives import encode_batch, response_nll

    model, _, trigger_ids = _planted_model("llama", micro_tokenizer)
    safety, utility = _planted_data(micro_tokenizer, trigger_ids)
    groups = find_unit_groups(model)
    linears = decoder_linears(model)
    outputs = {g.output: linears[g.output] for g in groups}
    search = dict(steps=1, lr=1e-9, sparsity=0.0, batch_size=4, max_length=96)
    without = find_circuit(model, micro_tokenizer, groups, outputs, safety, utility, **search)
    weighted = find_circuit(model, micro_tokenizer, groups, outputs, safety, utility, sufficiency=0.5, **search)
    # Every unit starts kept, so the circuit starts empty: "only the circuit" is every unit removed.
    everything = units_to_masks(groups, {g.key: torch.ones(g.size, dtype=torch.bool) for g in groups})
    with torch.no_grad(), threatened(model, MaskAblation(everything)):
        alone = float(response_nll(model, encode_batch(micro_tokenizer, safety[:4], 96)))
    assert weighted.losses[0] - without.losses[0] == pytest.approx(0.5 * alone, rel=1e-4)
    assert weighted.passes.forward == without.passes.forward + 1 and weighted.passes.backward == without.passes.backward + 1
    # The hooks are gone and the complement switch is off again: the model is untouched.
    with torch.no_grad():
        assert float(response_nll(model, encode_batch(micro_tokenizer, safety[:4], 96))) != pytest.approx(alone)


def test_the_agreement_tables_compare_methods_entry_by_entry(micro_checkpoint, tmp_path):
    from zorefine.analyze import stage as analyze
    from zorefine.analyze.unit_agreement import agreement_markdown, jaccard
    from zorefine.run import Run

    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([False, True, True, False]), "v": torch.tensor([True])}
    assert jaccard(a, b) == 1 / 4 and jaccard(a, a) == 1.0
    runs = []
    for method in ("ssah", "wanda_diff"):
        runs.append(tmp_path / method)
        analyze.run(Run(make_cfg(micro_checkpoint, stages="[analyze]", **{
            "align.enabled": False, "analyze.method": method, "analyze.units.prompts": 4, "analyze.units.ablation_prompts": 2,
            "analyze.units.ablation_draws": 1, "analyze.units.max_new_tokens": 2}), runs[-1]))
    layers = tmp_path / "layers"
    analyze.run(Run(make_cfg(micro_checkpoint, stages="[analyze]", **{"align.enabled": False, "analyze.measure_refusal": False,
                                                                       "analyze.curvature": False, "analyze.seeds": 1}), layers))
    text = agreement_markdown(runs, layers)
    assert "| ssah (scu) | 1 |" in text and "Spearman" in text and "Least agreement" in text


# --------------------------------------------------------------------------- refinement on a unit set


def test_zo_refines_only_a_unit_set_and_replays_it_bit_for_bit(micro_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from zorefine.analyze import stage as analyze
    from zorefine.errors import DataError
    from zorefine.refine import stage as refine
    from zorefine.run import Run
    from zorefine.zo.replay import replay
    from zorefine.zo.trajectory import read_trajectory

    analysis = tmp_path / "analysis"
    analyze.run(Run(make_cfg(micro_checkpoint, stages="[analyze]", **{
        "align.enabled": False, "analyze.method": "ssah", "analyze.units.prompts": 4, "analyze.units.ablation_prompts": 2,
        "analyze.units.ablation_draws": 1, "analyze.units.max_new_tokens": 2, "analyze.units.scu": 0.1}), analysis))
    units_file = analysis / "units.safetensors"
    scu = load_masks(units_file)["scu"]
    cfg = make_cfg(micro_checkpoint, stages="[refine]", **{"align.enabled": False, "refine.units_file": str(units_file),
                                                            "refine.units_set": "scu", "refine.lr": 1e-2, "refine.steps": 3})
    summary = refine.run(Run(cfg, tmp_path / "refined"))
    # The engine holds the set's entries only: its cost follows the set, not the tensors.
    assert summary["num_parameters"] == count_entries(scu)
    base = load_file(str(micro_checkpoint / "model.safetensors"))
    refined = load_file(str(tmp_path / "refined" / "checkpoints" / "refined" / "model.safetensors"))
    for name, before in base.items():
        if name in scu:
            assert torch.equal(refined[name][~scu[name]], before[~scu[name]]), name
            assert not torch.equal(refined[name][scu[name]], before[scu[name]]), name
        else:
            assert torch.equal(refined[name], before), name
    header, steps = read_trajectory(tmp_path / "refined" / "trajectory.jsonl")
    assert header["entries"]["set"] == "scu" and len(steps) == 3
    replayed = load_file(str(replay(micro_checkpoint, tmp_path / "refined" / "trajectory.jsonl", tmp_path / "replayed") / "model.safetensors"))
    assert all(torch.equal(replayed[n], t) for n, t in refined.items())
    # The units file is part of the patch: without it (or changed) replay refuses clearly.
    units_file.rename(units_file.with_suffix(".moved"))
    with pytest.raises(DataError, match="missing"):
        replay(micro_checkpoint, tmp_path / "refined" / "trajectory.jsonl", tmp_path / "replayed-again")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_entry_set_holding_every_entry_steps_exactly_like_the_whole_tensor(optimizer):
    from zorefine.zo.engine import ZOEngine, ZOSettings

    results = []
    for as_entries in (False, True):
        model = tiny_model("llama")
        name = "model.layers.1.mlp.down_proj.weight"
        params = {name: dict(model.named_parameters())[name]}
        entries = {name: torch.arange(params[name].numel())} if as_entries else None
        engine = ZOEngine(params, settings=ZOSettings(eps=1e-2, optimizer=optimizer, store="copy"), entries=entries)
        ids = tiny_input_ids()
        for step in range(3):
            engine.step(step, 100 + step, 1e-2, lambda: model(input_ids=ids, labels=ids).loss)
        results.append(params[name].detach().clone())
    assert torch.equal(results[0], results[1])


def test_one_run_can_find_a_unit_set_and_refine_it(micro_checkpoint, tmp_path):
    from zorefine.config.validate import validate
    from zorefine.errors import ConfigError
    from zorefine.pipeline import run_pipeline
    from zorefine.stage_identity import missing_outputs
    from zorefine.run import Run
    from zorefine.config.schema import Stage

    cfg = make_cfg(micro_checkpoint, stages="[analyze,refine]", **{
        "align.enabled": False, "analyze.method": "ssah", "analyze.units.prompts": 4, "analyze.units.ablation_prompts": 2,
        "analyze.units.ablation_draws": 1, "analyze.units.max_new_tokens": 2, "analyze.units.scu": 0.1,
        "refine.units_file": "analyze", "refine.units_set": "scu", "refine.steps": 2})
    validate(cfg)
    run_pipeline(cfg, tmp_path)
    run = Run(cfg, tmp_path)
    assert run.stage_summary(Stage.refine)["num_parameters"] == count_entries(load_masks(tmp_path / "units.safetensors")["scu"])
    # A finished unit analysis is complete with its own outputs (no sensitivity.json).
    assert missing_outputs(run, Stage.analyze, run.stage_summary(Stage.analyze)) == []
    with pytest.raises(ConfigError, match="units_file=analyze"):
        validate(make_cfg(micro_checkpoint, **{"refine.units_file": "analyze"}))


def test_zorefine_finetune_saves_a_checkpoint_with_the_frozen_sets_unchanged(micro_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file

    from zorefine.analyze import stage as analyze
    from zorefine.finetune import main
    from zorefine.run import Run

    analysis = tmp_path / "analysis"
    analyze.run(Run(make_cfg(micro_checkpoint, stages="[analyze]", **{
        "align.enabled": False, "analyze.method": "ssah", "analyze.units.prompts": 4, "analyze.units.ablation_prompts": 2,
        "analyze.units.ablation_draws": 1, "analyze.units.max_new_tokens": 2}), analysis))
    units = analysis / "units.safetensors"
    main([str(micro_checkpoint), str(tmp_path / "tuned"), "--steps", "2", "--lr", "1e-2", "--batch-size", "2",
          "--data", str(TINY_SAFETY), "--freeze", f"{units}:scu+cu"])
    frozen = load_masks(units)
    before = load_file(str(micro_checkpoint / "model.safetensors"))
    after = load_file(str(tmp_path / "tuned" / "model.safetensors"))
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved
    for label in ("scu", "cu"):
        for name, mask in frozen[label].items():
            assert torch.equal(after[name][mask], before[name][mask])
    with pytest.raises(SystemExit):
        main([str(micro_checkpoint), str(tmp_path / "bad"), "--steps", "1", "--lr", "1e-2", "--freeze", f"{units}:nope"])
    assert "holds no set" in capsys.readouterr().err


def test_the_freezing_table_says_when_freezing_lost_more_refusal():
    from zorefine.analyze.units_report import _freezing_verdict

    def row(mean, low, high):
        excludes = low > 0 or high < 0
        return {"frozen": "scu", "keeps_refusal": excludes and mean > 0,
                "refusal_minus_full_finetune": {"mean": mean, "low": low, "high": high, "excludes_zero": excludes}}

    assert _freezing_verdict(row(0.35, 0.19, 0.52)) == "yes"
    assert _freezing_verdict(row(-0.25, -0.40, -0.10)) == "no: lower than the full fine-tune"
    assert _freezing_verdict(row(0.02, 0.0, 0.06)) == "no significant change"
