"""The Accelerate recipe: prepare, accumulate, backward through the accelerator, one synthesis per
real step on the full accumulated gradients -- equal to the plain loop."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import fresh_accelerate_state, paired_examples, params_of, reference_run, tiny_llama

pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from gradsynth import SynthesizingOptimizer  # noqa: E402
from gradsynth.integrations.accelerate_tasks import AcceleratedTasks  # noqa: E402
from gradsynth.integrations.task_batches import TaskPairCollator  # noqa: E402
from gradsynth.integrations.task_losses import gradient_ascent_loss, nll_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
_ = fresh_accelerate_state

LR, MAX_NORM, ACCUMULATION, BATCH = 3e-3, 0.5, 2, 2


def _accelerate_run(examples, *, by_hand: bool):
    """The documented loop; ``by_hand`` spells out accelerator.backward + backward_*(None)."""
    import transformers

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=ACCUMULATION)
    model = tiny_llama()
    opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=LR), "sago")
    steps = len(examples) // (BATCH * ACCUMULATION)
    sched = transformers.get_linear_schedule_with_warmup(opt, 0, steps)
    loader = torch.utils.data.DataLoader(examples, batch_size=BATCH, collate_fn=TaskPairCollator())
    model, optimizer, loader, sched = accelerator.prepare(model, opt, loader, sched)
    tasks = AcceleratedTasks(accelerator, optimizer)
    assert tasks.optimizer is opt
    syntheses = 0
    for batch in loader:
        with accelerator.accumulate(model):
            if by_hand:
                accelerator.backward(gradient_ascent_loss(model, batch["forget"]))
                opt.backward_forget(None)
                accelerator.backward(nll_loss(model, batch["retain"]))
                opt.backward_retain(None)
            else:
                tasks.backward_forget(gradient_ascent_loss(model, batch["forget"]))
                tasks.backward_retain(nll_loss(model, batch["retain"]))
            if tasks.synthesize():
                syntheses += 1
                accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
            optimizer.step()
            sched.step()
            optimizer.zero_grad()
    return accelerator.unwrap_model(model), syntheses, steps


@pytest.mark.parametrize("by_hand", [False, True], ids=["AcceleratedTasks", "backward_None"])
def test_accelerate_loop_equals_the_plain_loop(by_hand):
    examples = paired_examples(8)
    model, syntheses, steps = _accelerate_run(examples, by_hand=by_hand)
    assert steps == 2 and syntheses == steps  # once per real step, not per micro-batch

    micro = [TaskPairCollator()(examples[i : i + BATCH]) for i in range(0, len(examples), BATCH)]
    reference, _ = reference_run(
        [m["forget"] for m in micro],
        [m["retain"] for m in micro],
        steps,
        ACCUMULATION,
        lr=LR,
        max_norm=MAX_NORM,
    )
    for name, p in params_of(model).items():
        torch.testing.assert_close(p, reference.get_parameter(name).detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_accelerated_tasks_needs_a_synthesizing_optimizer():
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_llama()
    optimizer = accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match=r"wrap the base optimizer before accelerator\.prepare"):
        AcceleratedTasks(accelerator, optimizer)
