"""Masking-rate schedules: pure functions of the step, the papers' defaults per objective, and the realized rate
of real batches following them."""

from __future__ import annotations

import math

import pytest
import torch

from masktrain.data.batches import MaskSpec, mlm_batch
from masktrain.data.loader import Batcher
from masktrain.data.masking import candidates
from masktrain.data.schedules import RateSchedule, rate_schedule
from masktrain.launcher.config import MaskingConfig, objective_defaults
from masktrain.launcher.loading import ConfigError, load_config
from masktrain.launcher.validate import schedule_notes
from test_masking import VOCAB, packed_rows


def test_constant_ignores_the_end_value():
    schedule = RateSchedule("constant", 0.2, 0.5, steps=10)
    assert {schedule(step) for step in range(0, 30)} == {0.2}


def test_linear_moves_from_start_to_end_then_holds():
    schedule = RateSchedule("linear", 0.3, 0.15, steps=100)
    assert schedule(0) == 0.3
    assert schedule(50) == pytest.approx(0.225)
    assert schedule(100) == pytest.approx(0.15)
    assert schedule(1000) == pytest.approx(0.15)
    assert schedule.final == pytest.approx(0.15)


@pytest.mark.parametrize("name", ["linear", "cosine", "step"])
def test_schedules_start_and_end_on_their_values_exactly(name):
    """Exactly, not approximately: the rate sets round(rate * n) masked tokens, and 0.1 - 2e-17 rounds 15
    candidates to 1 token where 0.1 rounds them to 2."""
    for start, end in ((0.4, 0.1), (0.3, 0.15), (0.15, 0.3), (0.5, 0.05)):
        schedule = RateSchedule(name, start, end, steps=100, warmup=7)
        assert schedule(0) == schedule(7) == start
        assert schedule(107) == schedule(10_000) == schedule.final == end
    # Equal ends (final_rate left unset): the rate never moves, by a bit either way.
    assert {RateSchedule(name, 0.15, 0.15, steps=1000)(step) for step in range(1002)} == {0.15}


def test_cosine_is_symmetric_and_monotone():
    schedule = RateSchedule("cosine", 0.4, 0.1, steps=200)
    values = [schedule(step) for step in range(201)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert schedule(100) == pytest.approx(0.25)
    assert schedule(50) - 0.1 == pytest.approx(0.4 - schedule(150))
    assert schedule(20) > 0.4 - (0.3 * 20 / 200)  # slow start, unlike linear


def test_step_has_equal_plateaus_from_start_to_end():
    schedule = RateSchedule("step", 0.3, 0.15, steps=100, plateaus=4)
    assert [round(schedule(s), 6) for s in (0, 24, 25, 49, 50, 75, 99, 100)] == \
        [0.3, 0.3, 0.25, 0.25, 0.2, 0.15, 0.15, 0.15]


def test_warmup_holds_the_start_value():
    schedule = RateSchedule("linear", 0.3, 0.1, steps=10, warmup=5)
    assert [schedule(s) for s in range(6)] == [0.3] * 6
    assert schedule(10) == pytest.approx(0.2)
    assert schedule(15) == pytest.approx(0.1)


def test_config_schedule_spans_the_run_after_warmup_unless_told():
    masking = MaskingConfig(schedule="linear", rate=0.3, final_rate=0.15, warmup_steps=10)
    assert rate_schedule(masking, max_steps=110).steps == 100
    masking.schedule_steps = 40
    assert rate_schedule(masking, max_steps=110)(50) == pytest.approx(0.15)


def test_schedules_that_do_not_finish_within_the_run_are_named_at_start():
    # A short trial of a full-size recipe: bert-base warms its LR up over 10,000 steps.
    (lr,) = schedule_notes(load_config("bert-base", ["trainer.max_steps=40"]))
    assert lr.startswith("optim.warmup_steps (10000) > trainer.max_steps (40): the learning rate ends its warmup at "
                         "8e-07, never reaching optim.lr (0.0002)")
    moving = ["trainer.max_steps=100", "optim.warmup_steps=10", "data.masking.schedule=linear",
              "data.masking.rate=0.3", "data.masking.final_rate=0.1"]
    assert schedule_notes(load_config("smoke", moving + ["data.masking.schedule_steps=100"])) == []
    (short,) = schedule_notes(load_config("smoke", moving + ["data.masking.warmup_steps=50",
                                                              "data.masking.schedule_steps=100"]))
    assert short == ("data.masking.warmup_steps + schedule_steps (50 + 100) > trainer.max_steps (100): the masking "
                     "rate ends at 0.202, never reaching final_rate (0.1)")
    (held,) = schedule_notes(load_config("smoke", moving + ["data.masking.warmup_steps=100"]))
    assert held.endswith("the masking rate stays at 0.3 and never moves to final_rate (0.1)")
    # The default schedule length fills the run after its warmup, and a constant rate has no end to reach.
    assert schedule_notes(load_config("smoke", moving + ["data.masking.warmup_steps=99"])) == []
    assert schedule_notes(load_config("smoke", ["trainer.max_steps=100", "optim.warmup_steps=10",
                                                "data.masking.schedule=constant", "data.masking.rate=0.2",
                                                "data.masking.warmup_steps=500"])) == []


def test_each_objective_gets_its_papers_defaults(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("model: {objective: mlm}\n")
    mlm = load_config(str(bare)).data.masking
    # MosaicML (Ankner et al.): linear 30% -> 15% for BERT, with BERT's 80/10/10.
    assert (mlm.schedule, mlm.rate, mlm.final_rate, mlm.mask_prob, mlm.random_prob) == ("linear", 0.3, 0.15, 0.8, 0.1)
    meap = load_config(str(bare), ["model.objective=meap"]).data.masking
    assert (meap.schedule, meap.rate, meap.mask_prob, meap.random_prob) == ("constant", 0.15, 1.0, 0.0)
    mae = objective_defaults("mae_lm", {})["data"]["masking"]
    assert (mae["rate"], mae["mask_prob"], mae["random_prob"]) == (0.15, 1.0, 0.0)


def test_a_user_schedule_replaces_the_objective_default_whole(tmp_path):
    bare = tmp_path / "bare.yaml"
    bare.write_text("model: {objective: mlm}\n")
    constant = load_config(str(bare), ["data.masking.rate=0.2"]).data.masking
    assert (constant.schedule, constant.rate, constant.final_rate) == ("constant", 0.2, None)
    cosine = load_config(str(bare), ["data.masking.schedule=cosine", "data.masking.rate=0.4",
                                     "data.masking.final_rate=0.1"]).data.masking
    assert (cosine.schedule, cosine.rate, cosine.final_rate) == ("cosine", 0.4, 0.1)
    # Without its start the rate would be the class default, 0.15: `schedule: linear, final_rate: 0.15` ran
    # flat, where mlm's own schedule starts at 0.3.
    with pytest.raises(ConfigError, match=r"data.masking.rate: unset, while data.masking.final_rate or schedule is "
                                          r"set; .*\(the mlm default starts at 0.3\)"):
        load_config(str(bare), ["data.masking.schedule=linear", "data.masking.final_rate=0.15"])
    # final_rate: null is set too (a constant schedule), so it drops mlm's start rate as well.
    with pytest.raises(ConfigError, match=r"data.masking.rate: unset"):
        load_config(str(bare), ["data.masking.final_rate=null"])
    # One of the three alone leaves the others at the class defaults, which would mask at a constant 15%.
    with pytest.raises(ConfigError, match="data.masking.final_rate: the constant schedule keeps data.masking.rate "
                                          r"\(0.15\) throughout, never 0.1; set data.masking.schedule"):
        load_config(str(bare), ["data.masking.final_rate=0.1"])
    with pytest.raises(ConfigError, match=r"the cosine schedule moves from data.masking.rate \(0.15\) to final_rate, "
                                          "which is unset: it would never move"):
        load_config(str(bare), ["data.masking.schedule=cosine"])


def test_bad_masking_settings_are_all_reported_with_valid_names():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["data.masking.policy=spans", "data.masking.schedule=exp", "data.masking.span_mean=0.5",
                              "data.masking.final_rate=0.0", "data.masking.schedule=step",
                              "data.masking.step_count=1"])
    text = "\n".join(err.value.problems)
    assert ("data.masking.policy: unknown masking policy 'spans': one of importance, pmi, random, span, whole_word, or "
            "your own as module:function") in text
    assert "data.masking.span_mean: must be within [1, span_max (10)], got 0.5" in text
    assert "data.masking.final_rate: objective mlm needs a masking rate > 0" in text
    assert "data.masking.step_count: the step schedule needs at least 2 plateaus" in text
    with pytest.raises(ConfigError, match="share_across_batch: one pattern for the whole batch only works with "
                                          "policy random"):
        load_config("smoke", ["data.masking.policy=span", "data.masking.share_across_batch=true"])


def test_a_policy_option_no_policy_of_the_run_reads_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config("smoke", ["data.masking.span_mean=5", "data.masking.importance_power=2"])
    assert err.value.problems == [
        "data.masking.span_mean: 5.0, but only the span policy reads it, and data.masking.policy is random; set "
        "policy or eval_policy to span, or drop the option",
        "data.masking.importance_power: 2.0, but only the importance policy reads it, and data.masking.policy is "
        "random; set policy or eval_policy to importance, or drop the option"]
    # Read by the evaluation's policy; a default written out (a full config used as a file); NTP, which reads
    # no masking option, so that the MEAP config it was switched from runs as it is.
    for overrides in (["data.masking.span_mean=5", "data.masking.eval_policy=span"], ["data.masking.span_max=10"],
                      ["data.masking.span_mean=5", "model.objective=ntp"]):
        load_config("smoke", overrides)


@pytest.mark.parametrize("overrides,message", [
    (["data.masking.mask_prob=0.9", "data.masking.random_prob=0.3"],
     "data.masking.mask_prob: mask_prob + random_prob must be <= 1 (the rest is kept), got 0.9 + 0.3"),
    (["data.masking.share_across_batch=true", "data.masking.eval_policy=span"],
     "data.masking.share_across_batch: one pattern for the whole batch only works with policy random"),
    (["data.masking.span_mean=12", "data.masking.span_max=10"],
     "data.masking.span_mean: must be within [1, span_max (10)], got 12"),
    (["data.seq_len=4"], "data.seq_len: must be at least 8, got 4"),
    (["data.prepare.val_fraction=1.0"], "data.prepare.val_fraction: must be within [0, 1), got 1.0"),
])
def test_settings_that_would_train_something_else_are_refused(overrides, message):
    """Each would otherwise run: 90/10/0 instead of 90/30, spans all of span_max, rows without room for a
    document, no training data at all, or a failure in the first batch instead of at the config."""
    with pytest.raises(ConfigError) as err:
        load_config("smoke", overrides)
    assert any(problem.startswith(message) for problem in err.value.problems), err.value.problems


@pytest.mark.parametrize("policy", ["random", "whole_word", "span"])
def test_realized_rate_follows_the_schedule_step_by_step(policy):
    """Batches built the way the loader builds them (rate from step = batch index // grad_accum)."""
    schedule = RateSchedule("linear", 0.4, 0.1, steps=6)
    batcher = Batcher(mlm_batch, MaskSpec(vocab=VOCAB, policy=policy), schedule, seed=5, rank=1, grad_accum=2)
    ids = packed_rows(rows=32, length=256)
    maskable = candidates(ids, VOCAB).sum().item()
    for index in range(0, 14):
        selected = (batcher(ids, index)["labels"] != -100).sum().item()
        expected = schedule(index // 2)
        # ~8,000 maskable tokens per batch; whole words add up to half a word per row.
        assert abs(selected / maskable - expected) < 0.01, (index, selected / maskable, expected)


def test_the_rate_is_a_pure_function_of_the_step():
    """What makes a resumed run use exactly the rate it would have used: no state besides the step."""
    masking = MaskingConfig(schedule="cosine", rate=0.3, final_rate=0.15, warmup_steps=3)
    schedule = rate_schedule(masking, 50)
    first = [schedule(step) for step in range(60)]
    # The same object asked again in another order, and a fresh one: state kept between calls would show.
    assert [schedule(step) for step in reversed(range(60))] == first[::-1]
    assert [rate_schedule(MaskingConfig(**vars(masking)), 50)(step) for step in range(60)] == first
    assert all(math.isfinite(v) and 0.15 <= v <= 0.3 for v in first)
    assert torch.tensor(first[3:54]).diff().le(0).all()
