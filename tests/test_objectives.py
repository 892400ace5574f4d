"""Every unlearning loss against values computed by hand on tiny tensors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from gradsynth.unlearning.evaluate import exact_match  # noqa: E402
from gradsynth.unlearning.objectives import (  # noqa: E402
    ga_loss,
    idkdpo_loss,
    kl_loss,
    nll_loss,
    npo_loss,
    sequence_logprob,
    simnpo_loss,
    undial_loss,
)
from gradsynth.unlearning.task_losses import LossSettings, forget_loss, retain_loss  # noqa: E402

LOG3 = math.log(3.0)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _batch():
    """Two sequences over a 2-token vocabulary.

    Row 0: position 0 predicts label 1 with p = 1/2, position 1 predicts label 0 with p = 3/4.
    Row 1: only position 1 is labelled (label 1, p = 1/4); position 0 is -100.
    The last position's logits predict nothing (the shift drops them).
    """
    logits = torch.tensor(
        [
            [[0.0, 0.0], [LOG3, 0.0], [5.0, -5.0]],
            [[9.0, -9.0], [LOG3, 0.0], [5.0, -5.0]],
        ]
    )
    labels = torch.tensor([[-100, 1, 0], [-100, -100, 1]])
    return logits, labels


def test_sequence_logprob_sums_answer_tokens_and_counts_them():
    logits, labels = _batch()
    logprob, length = sequence_logprob(logits, labels)
    assert logprob.tolist() == pytest.approx([math.log(0.5) + math.log(0.75), math.log(0.25)])
    assert length.tolist() == [2, 1]


def test_nll_is_the_mean_over_all_answer_tokens_of_the_batch():
    logits, labels = _batch()
    expected = -(math.log(0.5) + math.log(0.75) + math.log(0.25)) / 3
    assert float(nll_loss(logits, labels)) == pytest.approx(expected)
    assert float(ga_loss(logits, labels)) == pytest.approx(-expected)


def test_ga_gradient_is_minus_the_nll_gradient():
    logits, labels = _batch()
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    nll_loss(a, labels).backward()
    ga_loss(b, labels).backward()
    assert torch.equal(b.grad, -a.grad)
    assert a.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_npo_matches_the_formula():
    logprob, ref = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -3.0])
    beta = 0.5
    terms = [math.log(_sigmoid(-beta * (lp - rp))) for lp, rp in ((-1.0, -2.0), (-4.0, -3.0))]
    expected = -(2 / beta) * sum(terms) / 2
    assert float(npo_loss(logprob, ref, beta)) == pytest.approx(expected)


def test_npo_at_the_reference_is_two_log_two_over_beta():
    logprob = torch.tensor([-3.0, -0.5])
    assert float(npo_loss(logprob, logprob, 0.25)) == pytest.approx(2 / 0.25 * math.log(2))


def test_simnpo_matches_the_formula():
    logprob, length = torch.tensor([-3.0, -1.0]), torch.tensor([2, 4])
    beta, delta = 1.0, 0.5
    terms = [math.log(_sigmoid(beta * (3.0 / 2 - delta))), math.log(_sigmoid(beta * (1.0 / 4 - delta)))]
    assert float(simnpo_loss(logprob, length, beta, delta)) == pytest.approx(-(2 / beta) * sum(terms) / 2)


def test_kl_matches_the_formula_and_is_zero_at_the_reference():
    logits, labels = _batch()
    ref = logits.clone()
    ref[0, 0] = torch.tensor([LOG3, 0.0])  # p_ref = (3/4, 1/4) where the model has (1/2, 1/2)
    # Labelled positions: row 0 positions 0 and 1, row 1 position 1; only row 0 position 0 differs.
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(kl_loss(logits, ref, labels)) == pytest.approx(kl / 3)
    assert float(kl_loss(logits, logits, labels)) == pytest.approx(0.0, abs=1e-7)


def test_idkdpo_matches_the_formula_and_is_two_log_two_over_beta_at_the_reference():
    # Row 0: the refusal gained 1 nat over the reference and the forget answer lost 0.5: margin 1.5.
    # Row 1: the refusal lost 2 nats, the forget answer is unchanged: margin -2.
    idk, ref_idk = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -3.0])
    forget, ref_forget = torch.tensor([-1.5, -4.0]), torch.tensor([-1.0, -4.0])
    beta = 0.5
    terms = [math.log(_sigmoid(beta * 1.5)), math.log(_sigmoid(beta * -2.0))]
    assert float(idkdpo_loss(idk, ref_idk, forget, ref_forget, beta)) == pytest.approx(
        -(2 / beta) * sum(terms) / 2
    )
    assert float(idkdpo_loss(idk, idk, forget, forget, 0.25)) == pytest.approx(2 / 0.25 * math.log(2))


def test_undial_is_the_cross_entropy_to_the_adjusted_reference():
    logits, labels = _batch()
    ref = torch.zeros_like(logits)  # the reference is uniform over the 2 tokens everywhere
    strength = math.log(3.0)
    # Lowering the answer token's logit by log 3 makes q = (1/4 for the answer, 3/4 for the other).
    # Row 0 position 0 (label 1, model p = (1/2, 1/2)): -(3/4 log 1/2 + 1/4 log 1/2) = log 2.
    # Row 0 position 1 (label 0, model p = (3/4, 1/4)): -(1/4 log 3/4 + 3/4 log 1/4).
    # Row 1 position 1 (label 1, model p = (3/4, 1/4)): -(3/4 log 3/4 + 1/4 log 1/4).
    terms = [
        math.log(2.0),
        -(0.25 * math.log(0.75) + 0.75 * math.log(0.25)),
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)),
    ]
    assert float(undial_loss(logits, ref, labels, strength)) == pytest.approx(sum(terms) / 3)
    # Strength 0 on the model's own logits: the entropy, whose gradient is zero (self-distillation).
    own = logits.clone().requires_grad_(True)
    undial_loss(own, logits, labels, 0.0).backward()
    assert own.grad.abs().max() < 1e-7


def test_exact_match_needs_every_answer_token():
    logits, labels = _batch()
    # Row 0: argmax at position 0 is token 0 (a tie resolves to 0) but the label is 1 -> miss.
    # Row 1: argmax at position 1 is token 0, label 1 -> miss. Flip row 1's label to hit.
    assert exact_match(logits, labels).tolist() == [False, False]
    labels[1, 2] = 0
    assert exact_match(logits, labels).tolist() == [False, True]
    assert not exact_match(logits, torch.full_like(labels, -100)).any()  # nothing labelled: no match


class _FixedModel:
    """Stands in for a causal LM: returns the same logits whatever the input."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits)


def test_task_losses_dispatch_to_the_formulas():
    logits, labels = _batch()
    batch = {"input_ids": labels.clamp_min(0), "attention_mask": torch.ones_like(labels), "labels": labels}
    model = _FixedModel(logits)
    nll = float(nll_loss(logits, labels))
    assert float(forget_loss(model, batch, LossSettings("ga"))) == pytest.approx(-nll)
    assert float(retain_loss(model, batch, LossSettings(retain="nll"))) == pytest.approx(nll)
    npo = forget_loss(model, batch, LossSettings("npo", beta=0.5), reference=model)
    assert float(npo) == pytest.approx(2 / 0.5 * math.log(2))
    logprob, length = sequence_logprob(logits, labels)
    simnpo = forget_loss(model, batch, LossSettings("simnpo", beta=2.0, delta=0.1))
    assert float(simnpo) == pytest.approx(float(simnpo_loss(logprob, length, 2.0, 0.1)))
    assert float(retain_loss(model, batch, LossSettings(retain="kl"), reference=model)) == pytest.approx(
        0, abs=1e-7
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"forget": "unlearn"}, "unknown forget loss"),
        ({"forget": "rmu", "retain": "nll"}, "does not go with the 'rmu' forget loss"),
        ({"forget": "ga", "retain": "activation"}, "'activation' needs RMU"),
        ({"forget": "rmu", "rmu_steering": float("inf")}, "rmu_steering"),
        ({"retain": "ce"}, "unknown retain loss"),
        ({"beta": 0}, "beta"),
    ],
)
def test_loss_settings_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossSettings(**kwargs)


@pytest.mark.parametrize(
    ("reference", "generated", "expected"),
    [
        ("the oboe", "The oboe", 1.0),
        ("a b c d", "a x c y d", 3 / 4),
        ("a b c d", "d c b a", 1 / 4),
        ("rye bread", "", 0.0),
        ("", "anything", 0.0),
    ],
)
def test_rouge_l_recall_by_hand(reference, generated, expected):
    from gradsynth.unlearning.generation import rouge_l_recall

    assert rouge_l_recall(reference, generated) == pytest.approx(expected)


def test_steps_for_epochs_covers_the_forget_set():
    from gradsynth.unlearning.loop import steps_for_epochs

    assert steps_for_epochs(2, n_forget=30, batch_size=16, grad_accum=1) == 4  # 60 examples / 16 -> 4 steps
    assert steps_for_epochs(1, n_forget=30, batch_size=4, grad_accum=8) == 1
    assert steps_for_epochs(0.01, n_forget=3, batch_size=16, grad_accum=1) == 1
