"""The comparable-forgetting protocol without the command line: the stopping rule inside the loop
(first step at or below the target, the cap, measured on the forget set only), the learning-rate
ladder, RMU through the loop, and the paper's objective weights."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_helpers import four_layer_llama  # noqa: E402

import gradsynth.unlearning.loop as loop_module  # noqa: E402
from gradsynth.unlearning.loop import StepRecord, UnlearnSettings, unlearn  # noqa: E402
from gradsynth.unlearning.paper_weights import PAPER_WEIGHTS  # noqa: E402
from gradsynth.unlearning.protocol import Rung, climb, ladder, reached  # noqa: E402
from gradsynth.unlearning.task_losses import LossSettings  # noqa: E402

_model = four_layer_llama


def _examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 40, (6,), generator=g).tolist()
        out.append((ids, [-100, -100, -100, *ids[3:]]))
    return out


FORGET, RETAIN = _examples(5, 1), _examples(7, 2)


def _scripted_recall(monkeypatch, values):
    """The loop's recall check returns ``values`` in turn; returns the list of batches it saw."""
    seen = []
    it = iter(values)

    def fake(model, batches, has_answers=True):
        seen.append(batches)
        return {"nll": 0.0, "recall": next(it)}

    monkeypatch.setattr(loop_module, "split_metrics", fake)
    return seen


def test_stops_after_the_first_step_at_or_below_the_target(monkeypatch):
    seen = _scripted_recall(monkeypatch, [0.9, 0.5, 0.1, 0.0, 0.0])
    settings = UnlearnSettings(rule="sago", steps=10, batch_size=2, forget_target=0.1)
    records = unlearn(_model(), FORGET, RETAIN, 0, settings)
    assert [r.step for r in records] == [1, 2, 3]  # 0.1 <= 0.1: equality stops
    assert [r.forget_recall for r in records] == [0.9, 0.5, 0.1]
    # Checked on the forget set only: one batch holding exactly the forget examples, every step.
    assert len(seen) == 3 and all(
        sum(len(b["input_ids"]) for b in batches) == len(FORGET) for batches in seen
    )
    assert reached(records, 0.1) and not reached(records, 0.05)


def test_the_cap_ends_a_run_that_does_not_reach_the_target(monkeypatch):
    _scripted_recall(monkeypatch, [0.9] * 4)
    records = unlearn(_model(), FORGET, RETAIN, 0, UnlearnSettings(steps=4, batch_size=2, forget_target=0.2))
    assert len(records) == 4 and not reached(records, 0.2)


def test_without_a_target_no_recall_is_measured(monkeypatch):
    seen = _scripted_recall(monkeypatch, [])
    records = unlearn(_model(), FORGET, RETAIN, 0, UnlearnSettings(steps=2, batch_size=2))
    assert len(records) == 2 and seen == [] and all(r.forget_recall is None for r in records)


def test_the_real_check_is_greedy_recall_of_the_forget_answers():
    model = _model()
    from gradsynth.unlearning.encoding import collate
    from gradsynth.unlearning.evaluate import split_metrics

    records = unlearn(model, FORGET, RETAIN, 0, UnlearnSettings(steps=3, batch_size=2, forget_target=0.0))
    # A random model knows none of the answers: recall 0 reaches the target 0 after the first step.
    assert len(records) == 1 and records[0].forget_recall == 0.0
    assert split_metrics(model, [collate(FORGET, 0)])["recall"] == 0.0


def test_ladder_is_geometric_and_refuses_nonsense():
    assert ladder(1e-3, 2.0, 4) == pytest.approx([1e-3, 2e-3, 4e-3, 8e-3])
    assert ladder(0.5, 3.0, 1) == [0.5]
    for bad in ((0.0, 2.0, 2), (1e-3, 1.0, 2), (1e-3, 2.0, 0)):
        with pytest.raises(ValueError, match="a ladder needs"):
            ladder(*bad)


def _records(recalls):
    return [StepRecord(i + 1, 0.0, 0.0, None, None, None, None, r) for i, r in enumerate(recalls)]


def test_climb_stops_at_the_first_rung_that_reaches_the_target():
    outcomes = {1.0: [0.9, 0.8], 2.0: [0.5, 0.05], 4.0: [0.0]}
    tried = []

    def run(lr):
        tried.append(lr)
        return f"model@{lr:g}", _records(outcomes[lr])

    result, records, rungs = climb(run, [1.0, 2.0, 4.0], 0.1)
    assert tried == [1.0, 2.0] and result == "model@2"
    assert rungs == [Rung(1.0, 2, False, 0.8), Rung(2.0, 2, True, 0.05)]
    assert [r.forget_recall for r in records] == [0.5, 0.05]


def test_climb_reports_the_last_rung_when_none_reaches_the_target():
    result, records, rungs = climb(lambda lr: (lr, _records([0.9, 0.7])), [1.0, 2.0], 0.1)
    assert result == 2.0 and [r.reached for r in rungs] == [False, False] and len(records) == 2
    assert rungs[-1].as_dict() == {"lr": 2.0, "steps": 2, "reached": False, "forget_recall": 0.7}
    with pytest.raises(ValueError, match="ladder is empty"):
        climb(lambda lr: (lr, []), [], 0.1)


def _runner(outcomes):
    tried = []

    def run(lr):
        tried.append(lr)
        return f"model@{lr:g}", _records(outcomes[lr])

    return run, tried


def test_climb_descends_from_a_first_rung_that_forgets_too_fast():
    # lr 1 erases the forget set in one step; 0.5 in two; 0.25 in four (>= min_steps 3).
    run, tried = _runner({1.0: [0.0], 0.5: [0.5, 0.0], 0.25: [0.9, 0.6, 0.3, 0.05], 0.125: [0.9]})
    result, records, rungs = climb(run, [1.0, 2.0], 0.1, min_steps=3, factor=2.0, descents=3)
    assert tried == [1.0, 0.5, 0.25] and result == "model@0.25" and len(records) == 4
    assert [(r.lr, r.steps, r.reached) for r in rungs] == [(1.0, 1, True), (0.5, 2, True), (0.25, 4, True)]


def test_climb_keeps_the_faster_rung_when_a_lower_rate_no_longer_forgets():
    run, tried = _runner({1.0: [0.0], 0.5: [0.9, 0.8, 0.7]})
    result, records, rungs = climb(run, [1.0], 0.1, min_steps=3, factor=2.0, descents=4)
    assert tried == [1.0, 0.5] and result == "model@1" and [r.forget_recall for r in records] == [0.0]
    assert [r.reached for r in rungs] == [True, False]


def test_climb_stops_descending_after_the_allowed_descents():
    run, tried = _runner({1.0: [0.0], 0.5: [0.0], 0.25: [0.0]})
    result, _, rungs = climb(run, [1.0], 0.1, min_steps=2, factor=2.0, descents=2)
    assert tried == [1.0, 0.5, 0.25] and result == "model@0.25" and len(rungs) == 3


def test_climb_does_not_descend_after_climbing_or_by_default():
    # The target reached at the second rung: the rate below it already failed, nothing to descend to.
    run, tried = _runner({1.0: [0.9, 0.8], 2.0: [0.0]})
    climb(run, [1.0, 2.0], 0.1, min_steps=3, descents=3)
    assert tried == [1.0, 2.0]
    run, tried = _runner({1.0: [0.0]})
    climb(run, [1.0], 0.1)  # min_steps 1: the ladder only climbs, as before
    assert tried == [1.0]


def test_rmu_through_the_loop_trains_only_its_weights_and_restores_the_others():
    model = _model()
    frozen = copy.deepcopy(model)
    settings = UnlearnSettings(rule="sago", lr=1e-2, steps=3, batch_size=3, losses=LossSettings("rmu"))
    assert settings.losses.retain == "activation"  # RMU's own pairing by default
    records = unlearn(model, FORGET, RETAIN, 0, settings)
    # Step 1: the retain loss is 0 (nothing has moved), so r = 0 and cos(f,r) is undefined.
    assert len(records) == 3 and records[0].retain_loss == 0.0 and records[0].cos_fr is None
    assert all(r.cos_fr is not None for r in records[1:])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, frozen.get_parameter(n))}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert all(p.requires_grad for p in model.parameters())  # frozen only for the run


def test_paper_weights_match_the_configs():
    # paper.md: SimNPO alpha 0.1, gamma 1, delta 0.1 and beta 0.1 (RWKU and WMDP-Cyber SimNPO+SAGO).
    simnpo = PAPER_WEIGHTS["simnpo"]
    assert (simnpo.alpha, simnpo.gamma, simnpo.beta, simnpo.delta) == (0.1, 1.0, 0.1, 0.1)
    assert (PAPER_WEIGHTS["npo"].beta, PAPER_WEIGHTS["npo"].alpha) == (1e-3, 1.0)
    assert (PAPER_WEIGHTS["ga"].alpha, PAPER_WEIGHTS["ga"].gamma) == (1.0, 1.0)
    from gradsynth.unlearning.objectives import FORGET_LOSSES

    assert set(PAPER_WEIGHTS) == set(FORGET_LOSSES)


def test_a_forget_target_outside_0_1_is_refused():
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="forget_target must be in"):
            UnlearnSettings(forget_target=bad)
