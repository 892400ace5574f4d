"""Reference models without a second copy, against today's full-copy path.

NPO: reference log-likelihoods computed once before unlearning and looked up per batch; a PEFT
model's KL reference: the same model with its adapters disabled. Each equals the run with a
frozen full copy of the model that runs its forward on every batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_helpers import VOCAB, params_of, tiny_llama

from gradsynth.unlearning.loop import UnlearnSettings, unlearn
from gradsynth.unlearning.reference import AdaptersDisabled, ReferenceLogprobs
from gradsynth.unlearning.task_losses import LossSettings

# AdamW divides by sqrt(v): float32 rounding differences of ~1e-7 in the reference values (padding
# to another width changes the batched sums) can move a near-zero coordinate's update by more.
RTOL, ATOL = 1e-5, 2e-5


def _examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Prompt + answer token lists of varied length; labels -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt, answer = 3 + i % 3, 2 + i % 4
        ids = torch.randint(1, VOCAB, (prompt + answer,), generator=g).tolist()
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def _settings(forget: str, retain: str) -> UnlearnSettings:
    losses = LossSettings(forget=forget, retain=retain, beta=0.5)
    return UnlearnSettings(rule="sago", lr=1e-2, steps=3, batch_size=4, grad_accum=2, losses=losses)


def _assert_close(got: dict, want: dict) -> None:
    for name, value in got.items():
        torch.testing.assert_close(value, want[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def test_npo_with_precomputed_reference_equals_the_full_copy():
    forget, retain = _examples(12, 1), _examples(12, 2)
    settings = _settings("npo", "nll")
    fast = tiny_llama()
    fast_records = unlearn(fast, forget, retain, 0, settings)  # no reference: precomputed by default
    slow = tiny_llama()
    copy_ = copy.deepcopy(slow).eval().requires_grad_(False)
    slow_records = unlearn(slow, forget, retain, 0, settings, copy_, precompute_reference=False)
    want = [r.forget_loss for r in slow_records]
    assert [r.forget_loss for r in fast_records] == pytest.approx(want, rel=1e-5)
    _assert_close(params_of(fast), params_of(slow))
    # The runs did move the model (else the comparison would prove nothing).
    start = tiny_llama().model.embed_tokens.weight
    assert not torch.allclose(params_of(fast)["model.embed_tokens.weight"], start)


def test_the_table_holds_one_value_per_forget_example_and_names_a_miss():
    model = tiny_llama()
    forget = _examples(5, 3)
    table = ReferenceLogprobs.compute(model, forget, pad_id=0, batch_size=2)
    assert len(table) == 5 and model.training  # the model's mode is restored
    values = table.lookup([forget[3], forget[0], forget[3]])
    assert values.shape == (3,) and values[0] == values[2] and bool((values < 0).all())
    with pytest.raises(KeyError, match="no precomputed reference log-likelihood"):
        table.lookup(_examples(1, 99))


def test_kl_without_a_reference_model_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="KL retain loss needs the frozen reference model"):
        unlearn(tiny_llama(), _examples(4, 1), _examples(4, 2), 0, _settings("ga", "kl"))


def test_peft_reference_is_the_model_with_adapters_disabled():
    """KL (and NPO) on a LoRA model: no reference passed equals a frozen full copy of the base."""
    peft = pytest.importorskip("peft")
    forget, retain = _examples(12, 1), _examples(12, 2)
    settings = _settings("npo", "kl")

    def lora():
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
        model = peft.get_peft_model(tiny_llama(), config)
        torch.manual_seed(5)  # LoRA's B starts at zero; move it so the adapters change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        return model

    fast = lora()
    reference = AdaptersDisabled(fast)
    with torch.no_grad():
        ids = torch.tensor([forget[0][0]])
        assert not torch.allclose(fast(input_ids=ids).logits, reference(input_ids=ids).logits)
        torch.testing.assert_close(reference(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)
    unlearn(fast, forget, retain, 0, settings)
    slow = lora()
    base_copy = tiny_llama().eval().requires_grad_(False)  # what the full-copy path holds
    unlearn(slow, forget, retain, 0, settings, base_copy, precompute_reference=False)
    got, want = params_of(fast), params_of(slow)
    assert any("lora_" in n for n in got)
    _assert_close(got, want)


def test_adapters_disabled_needs_a_peft_model():
    with pytest.raises(TypeError, match="no disable_adapter"):
        AdaptersDisabled(torch.nn.Linear(2, 2))


def test_kl_reference_sharded_like_the_model(tmp_path):
    """FSDP2 (also CPU-offloaded) and ZeRO-3: unlearning with the KL reference sharded like the
    model ends bit-identical to the run with a replicated full copy, on 2 processes; the
    reference holds half of the parameters per rank and does not move."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    import distributed_cases
    import reference_cases

    distributed_cases.spawn(reference_cases.sharded_reference_case, tmp_path, timeout=300)


def test_fsdp2_reference_refuses_an_unsharded_model():
    from gradsynth.integrations.sharded_reference import fsdp2_reference

    with pytest.raises(TypeError, match="not sharded by fully_shard"):
        fsdp2_reference(tiny_llama(), tiny_llama())
