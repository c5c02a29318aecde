"""Spiking sites beyond the FFN (q/k/v, o, the LM head) on GPT-2, Llama and Gemma 3 tiny models.

Every site goes through calibration, conversion, its metadata, ``load_hybrid``, the energy model
and training; the family descriptions in ``models/families.py`` are the only place a site is defined.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import calibration_batches, tiny_model
from pipeline_support import assert_clean_failure, inside, invoke, run_stages, tiny_params, write_params

from snn_research.config import ConversionParams, ParamsError, load_params
from snn_research.conversion.ann_to_snn_converter import TeacherIdentity, convert, load_hybrid, save_hybrid
from snn_research.conversion.calibrator import Calibrator
from snn_research.evaluation.energy import measure_energy
from snn_research.models.families import FAMILIES, SITE_NAMES
from snn_research.models.hybrid_transformer import (
    HybridPlan,
    SpikeRecorder,
    SpikingSite,
    set_analog,
    spiking_parameter_groups,
    spiking_units,
)
from snn_research.training.layerwise import layerwise_distill

ALL = ["ffn", "qkv", "o", "head"]
SRC = Path(__file__).resolve().parents[1] / "src" / "snn_research"


def plan_for(family: str, sites, time_steps: int = 6, **extra) -> HybridPlan:
    encoder = "if" if family == "gpt2" else "weighted"  # GPT-2's hidden neurons take 'if' or 'rate'
    return HybridPlan(sites=sites, time_steps=time_steps, encoder=encoder, **extra)


def converted(family: str, sites, layers: int = 2, **extra):
    teacher = tiny_model(family, layers)
    plan = plan_for(family, sites, **extra)
    calibrator = Calibrator(teacher, sites=plan.sites)
    calibrator.run(calibration_batches())
    calibrator.remove_hooks()
    identity = TeacherIdentity(source=f"random:{family}", sha256="0" * 64, model_type=teacher.config.model_type,
                               architectures=["X"], num_layers=layers)
    hybrid, metadata, tensors = convert(teacher, calibrator.result(99.9), plan, identity, "f" * 64)
    return teacher, hybrid, metadata, calibrator


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def test_calibration_sees_each_site_with_its_width(family):
    teacher = tiny_model(family)
    calibrator = Calibrator(teacher, sites=ALL)
    calibrator.run(calibration_batches())
    config = teacher.config
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    widths = {key: h.channels for key, h in calibrator.histograms.items()}
    attention = "attn" if family == "gpt2" else "self_attn"
    blocks = "transformer.h" if family == "gpt2" else "model.layers"
    assert widths[f"{blocks}.1.{attention}:qkv"] == hidden
    assert widths[f"{blocks}.1.{attention}:o"] == heads * head_dim
    assert widths["lm_head:head"] == hidden
    assert all(h.observed == 4 * 2 * 24 for h in calibrator.histograms.values())  # every site saw every token
    assert len(widths) == 2 * 4 + 1  # two FFN sites, qkv and o per block; one head site


def test_only_the_chosen_sites_are_calibrated():
    teacher = tiny_model("llama")
    assert {k.rsplit(":", 1)[1] for k in Calibrator(teacher).histograms} == {"input", "product"}
    assert set(Calibrator(teacher, sites=["o"]).histograms) == {"model.layers.0.self_attn:o", "model.layers.1.self_attn:o"}


def test_every_site_converts_records_its_metadata_and_runs_analog_as_the_teacher(family, input_ids):
    teacher, hybrid, metadata, _ = converted(family, ALL)
    assert len(metadata.sites) == 9 and metadata.plan.sites == ALL
    by_site = {}
    for site in metadata.sites:
        by_site.setdefault(site.site, []).append(site)
    assert [s.layer for s in by_site["head"]] == [None] and by_site["head"][0].consumers == ["lm_head"]
    qkv = by_site["qkv"][0]
    assert qkv.consumers == (["c_attn"] if family == "gpt2" else ["q_proj", "k_proj", "v_proj"])
    assert qkv.class_after == "SpikingSite" and qkv.role == "encoder" and qkv.module_path.endswith(("attn", "self_attn"))
    assert set(qkv.weight_shapes) == set(qkv.consumers)
    # spiking changes the output; the analog switch gives the teacher's back
    assert not torch.allclose(logits(hybrid, input_ids), logits(teacher, input_ids), atol=1e-4)
    set_analog(hybrid, True)
    torch.testing.assert_close(logits(hybrid, input_ids), logits(teacher, input_ids), rtol=0, atol=1e-5)


def test_a_site_outside_the_ffn_alone_approximates_the_teacher_and_spikes(family, input_ids):
    """Only the LM head's input spikes: a fine code is close to the teacher, and every consumer call is fed spikes."""
    teacher, hybrid, _, _ = converted(family, ["head"], time_steps=12 if family != "gpt2" else 64)
    assert [type(u).__name__ for u in spiking_units(hybrid)] == ["SpikingSite"]
    out, ref = logits(hybrid, input_ids), logits(teacher, input_ids)
    assert not torch.equal(out, ref)
    assert (out - ref).abs().max() / ref.abs().max() < 0.1
    with SpikeRecorder(hybrid) as recorder:
        logits(hybrid, input_ids)
    assert recorder.tokens["lm_head:head"] == input_ids.numel()
    assert recorder.spikes["lm_head:head"] > 0


def test_qkv_shares_one_encoding_across_its_three_consumers(input_ids):
    """q, k and v receive the same spikes, counted once: as if one encoder fed all three."""
    teacher, hybrid, _, _ = converted("llama", ["qkv"], layers=1)
    site = next(spiking_units(hybrid))
    seen = []
    handles = [m.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for m in site.consumers]
    with SpikeRecorder(hybrid) as recorder:
        logits(hybrid, input_ids)
    for handle in handles:
        handle.remove()
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2]  # one decoded tensor, handed to all three
    assert recorder.tokens["model.layers.0.self_attn:qkv"] == input_ids.numel()  # encoded (and counted) once
    assert site._cache is None  # dropped when the attention returned


def test_a_copy_keeps_its_own_sites(input_ids):
    """The consumer hooks of a deep copy call the copy's encoders, not the original's."""
    _, hybrid, _, _ = converted("gemma3", ["qkv", "head"])
    before = logits(hybrid, input_ids)
    twin = copy.deepcopy(hybrid)
    with torch.no_grad():
        for unit in spiking_units(twin):
            getattr(unit, f"{unit.site}_encoder").log_threshold.add_(0.7)
    torch.testing.assert_close(logits(hybrid, input_ids), before, rtol=0, atol=0)
    assert not torch.allclose(logits(twin, input_ids), before)


def test_save_and_load_rebuild_every_site(tmp_path, family, input_ids):
    _, hybrid, metadata, _ = converted(family, ALL)
    with torch.no_grad():  # trained-looking thresholds: the reload must take them from the weights file
        for unit in spiking_units(hybrid):
            if isinstance(unit, SpikingSite):
                getattr(unit, f"{unit.site}_encoder").log_threshold.add_(0.1)
    save_hybrid(hybrid, None, metadata, tmp_path / "h")
    again = load_hybrid(tmp_path / "h")
    torch.testing.assert_close(logits(again, input_ids), logits(hybrid, input_ids), rtol=0, atol=0)
    stored = json.loads((tmp_path / "h" / "hybrid.json").read_text())
    assert [s["site"] for s in stored["sites"]].count("head") == 1


def test_training_reaches_the_sites_and_leaves_a_tied_embedding_alone(family, input_ids):
    _, hybrid, _, _ = converted(family, ["qkv", "o", "head"])
    weights, dynamics = spiking_parameter_groups(hybrid)
    ids = {id(p) for p in weights}
    embedding = hybrid.get_input_embeddings().weight
    tied = hybrid.lm_head.weight is embedding
    assert (id(hybrid.lm_head.weight) in ids) == (not tied)
    attention = hybrid.transformer.h[0].attn if family == "gpt2" else hybrid.model.layers[0].self_attn
    consumers = [attention.c_attn, attention.c_proj] if family == "gpt2" else [
        attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]
    assert all(id(m.weight) in ids for m in consumers)
    assert len(dynamics) == 2 * 2 + 1  # one log-threshold per site
    loss = hybrid(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dynamics)


def test_layerwise_training_trains_a_blocks_attention_sites():
    teacher, hybrid, _, _ = converted("llama", ["ffn", "qkv", "o"])
    q_before = hybrid.model.layers[0].self_attn.q_proj.weight.detach().clone()
    reports = layerwise_distill(teacher, hybrid, torch.cat(calibration_batches(2)), batch_size=2,
                                steps_per_layer=3, lr=1e-3, threshold_lr=1e-2)
    assert [r.layer for r in reports] == [0, 1]
    assert not torch.equal(hybrid.model.layers[0].self_attn.q_proj.weight, q_before)
    assert torch.equal(teacher.model.layers[0].self_attn.q_proj.weight, q_before)  # the teacher is untouched


def test_energy_counts_a_head_site_by_hand():
    """LM head only, one layer: its dense MACs become spikes x vocabulary synaptic events."""
    teacher, hybrid, _, _ = converted("llama", ["head"], layers=1)
    input_ids = calibration_batches(1)[0]
    report = measure_energy(hybrid, input_ids)
    hidden, vocab, steps = hybrid.config.hidden_size, hybrid.config.vocab_size, 6
    with SpikeRecorder(hybrid) as recorder:
        logits(hybrid, input_ids)
    spikes = recorder.spikes["lm_head:head"] / input_ids.numel()
    assert report.teacher_ops["proj_dense"] == (hidden * vocab, 0.0)  # the LM head has no bias
    assert "lm_head" not in report.hybrid_ops  # its analog MACs are gone from the hybrid
    macs, acs = report.hybrid_ops["proj_synaptic"]
    assert macs == 0 and acs == pytest.approx(spikes * vocab)
    assert report.hybrid_ops["proj_neurons"] == (0.0, pytest.approx(hidden * steps))  # one integration per step
    assert report.hybrid_ops["proj_step_weights"] == (0.0, pytest.approx(vocab * steps))  # weighted code: Horner
    assert report.hybrid_ops["proj_spiking_analog"] == (pytest.approx(vocab), 0.0)  # decoder rescale per logit
    # the teacher side is the teacher itself, counted by its own pass
    assert report.teacher_energy_pj == pytest.approx(measure_energy(teacher, input_ids).hybrid_energy_pj, rel=1e-9)


def test_sites_outside_the_ffn_leave_the_ffn_ratio_and_enter_the_model_ratio(family):
    input_ids = calibration_batches(1)[0]
    _, ffn_only, _, _ = converted(family, ["ffn"])
    teacher, with_head, _, _ = converted(family, ["ffn", "head"])
    plain, headed = measure_energy(ffn_only, input_ids), measure_energy(with_head, input_ids)
    assert headed.ffn_energy_ratio == pytest.approx(plain.ffn_energy_ratio, rel=1e-12)  # the head is downstream
    assert headed.model_energy_ratio != pytest.approx(plain.model_energy_ratio, rel=1e-6)
    assert headed.teacher_energy_pj == pytest.approx(plain.teacher_energy_pj, rel=1e-9)
    assert {s.key for s in headed.sites} - {s.key for s in plain.sites} == {"lm_head:head"}


def test_plan_and_params_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="at least one site group"):
        HybridPlan(sites=[])
    with pytest.raises(ValueError, match="twice"):
        HybridPlan(sites=["qkv", "qkv"])
    with pytest.raises(ValueError, match="sites"):
        HybridPlan(sites=["softmax"])
    with pytest.raises(ValueError, match="clipping"):
        ConversionParams(sites=["qkv"], clipping="search")
    assert ConversionParams(sites=["qkv"], clipping="percentile").plan().sites == ["qkv"]


def test_the_pipeline_stages_run_every_site(workdir):
    """calibrate -> convert -> distill -> finetune -> evaluate with every site spiking (tiny Gemma 3)."""
    params = tiny_params(convert__sites=ALL)
    write_params(params)
    run_stages("download-teacher", "split", "calibrate", "convert", "distill", "finetune", "finetune-teacher",
               "evaluate")
    metadata = json.loads(Path("reports/conversion_metadata.json").read_text())
    assert {s["site"] for s in metadata["sites"]} == {"input", "product", "qkv", "o", "head"}
    energy = json.loads(Path("reports/evaluation/energy.json").read_text())["finetuned"]
    keys = {site["key"] for site in energy["sites"]}
    assert "lm_head:head" in keys and "model.layers.1.self_attn:o" in keys and len(keys) == 2 * 4 + 1
    assert energy["model_energy_ratio"] < 1.0 and energy["ffn_energy_ratio"] < 1.0
    metrics = json.loads(Path("reports/metrics.json").read_text())
    assert metrics["finetuned"]["model_energy_ratio"] == pytest.approx(energy["model_energy_ratio"], abs=1e-6)


def test_calibrate_refuses_a_site_the_convert_params_do_not_know(workdir):
    write_params(tiny_params(convert__sites=["ffn", "softmax"]))
    assert_clean_failure(invoke("calibrate"), 2)


# the code that builds, calibrates, converts, prices and trains spiking sites (report columns and plot
# markers elsewhere may use the same words for other things)
SPIKING_CODE = ["models", "conversion", "training", "hybrid", "evaluation/energy.py", "evaluation/baselines.py",
                "generate.py", "stages/calibrate.py", "stages/convert.py", "stages/distill.py", "teacher.py"]


def test_a_site_name_is_defined_in_one_place():
    """Outside the family descriptions the spiking code never spells a site's name as a string literal."""
    files = [p for entry in SPIKING_CODE for p in ([SRC / entry] if entry.endswith(".py") else (SRC / entry).rglob("*.py"))]
    assert len(files) > 15
    sources = {path: path.read_text() for path in files}
    for name in SITE_NAMES:
        pattern = re.compile(rf"""["']{name}["']""")
        homes = [path.relative_to(SRC).as_posix() for path, text in sources.items() if pattern.search(text)]
        assert homes == ["models/families.py"], (name, homes)
    assert {spec.name for f in FAMILIES.values() for spec in f.sites} == set(SITE_NAMES)


def test_a_consumer_called_with_a_keyword_input_is_fed_spikes(input_ids):
    """o_proj(input=x) gets the same spikes as o_proj(x): the hook does not depend on how it is called."""
    _, hybrid, _, _ = converted("llama", ["o"], layers=1)
    site = next(spiking_units(hybrid))
    (o_proj,) = site.consumers
    x = torch.randn(2, 5, o_proj.in_features)
    with torch.no_grad():
        positional, keyword = o_proj(x), o_proj(input=x)
        set_analog(hybrid, True)
        analog = o_proj(input=x)
    assert torch.equal(positional, keyword)
    assert not torch.equal(keyword, analog)


def test_the_shared_qkv_encoding_is_dropped_when_the_attention_raises(input_ids):
    """An exception inside the attention leaves no cached activation behind for the next call."""
    _, hybrid, _, _ = converted("llama", ["qkv"], layers=1)
    site = next(spiking_units(hybrid))

    def fail(*_args):
        raise RuntimeError("stop inside the attention")

    handle = site.consumers[-1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="stop inside"):
        logits(hybrid, input_ids)
    handle.remove()
    assert site._cache is None


def test_gpt2_options_for_its_ffn_neurons_are_refused_only_when_its_ffn_spikes(input_ids):
    assert HybridPlan(sites=["qkv", "o"], encoder="weighted").family_conflicts("gpt2") == []
    assert [c[0] for c in HybridPlan(sites=["ffn", "qkv"], encoder="weighted").family_conflicts("gpt2")] == ["encoder"]
    assert [c[0] for c in HybridPlan(sites=["qkv"], neuron="lif").family_conflicts("gpt2")] == ["neuron"]
    assert [c[0] for c in HybridPlan(sites=["head"], reset="zero").family_conflicts("gpt2")] == ["reset"]
    assert HybridPlan(sites=["ffn"], reset="zero").family_conflicts("gpt2") == []
    # a weighted code at GPT-2's attention sites converts and runs close to the teacher
    teacher = tiny_model("gpt2", 2)
    plan = HybridPlan(sites=["qkv", "o"], time_steps=8, encoder="weighted")
    calibrator = Calibrator(teacher, sites=plan.sites)
    calibrator.run(calibration_batches())
    calibrator.remove_hooks()
    identity = TeacherIdentity(source="random:gpt2", sha256="0" * 64, model_type="gpt2", architectures=["X"],
                               num_layers=2)
    hybrid, _, _ = convert(teacher, calibrator.result(99.9), plan, identity, "f" * 64)
    out, ref = logits(hybrid, input_ids), logits(teacher, input_ids)
    assert not torch.equal(out, ref) and (out - ref).abs().max() / ref.abs().max() < 0.2


@pytest.mark.parametrize(("field", "value"), [("energy.ffn_budget", 0.3), ("distill.ffn_mse_weight", 0.5)])
def test_params_refuse_ffn_only_training_terms_without_a_spiking_ffn(tmp_path, field, value):
    def load(**values):
        values = {"energy__ffn_budget": None, **values, field.replace(".", "__"): value}
        return load_params(write_params(tiny_params(**values), tmp_path / "params.yaml"))

    with pytest.raises(ParamsError, match=re.escape(field) + ".*spikes no FFN"):
        load(convert__sites=["qkv", "o"], convert__clipping="percentile", convert__search_blocks=None)
    assert load(convert__sites=["ffn", "qkv"]).convert.sites == ["ffn", "qkv"]


def test_finetune_teacher_with_nothing_to_train_writes_the_teacher_unchanged(workdir):
    """sites [head] on tiny Gemma 3, whose head is tied to the embedding: the hybrid trains thresholds only."""
    write_params(tiny_params(convert__sites=["head"], convert__clipping="percentile", convert__search_blocks=None,
                             energy__ffn_budget=None, distill__ffn_mse_weight=0.0))
    run_stages("download-teacher", "split", "finetune-teacher")
    from safetensors.torch import load_file

    teacher, tuned = (load_file(next(Path(folder).glob("*.safetensors")))
                      for folder in ("models/teacher", "models/teacher_finetuned"))
    assert teacher.keys() == tuned.keys()
    assert all(torch.equal(teacher[k], tuned[k]) for k in teacher)
    manifest = json.loads(next(Path("models/teacher_finetuned").glob("*manifest*.json")).read_text())
    assert manifest["summary"]["trained_parameters"] == 0
