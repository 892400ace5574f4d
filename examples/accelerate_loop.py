"""Unlearning in an Accelerate training loop with gradient accumulation.

What it shows
-------------
The loop a user of Hugging Face Accelerate writes, with gradsynth in it: ``accelerator.prepare``
on the model, a `SynthesizingOptimizer`, the data loader and the LR scheduler;
``accelerator.accumulate`` for gradient accumulation; each task's backward through
``AcceleratedTasks`` (what ``accelerator.backward`` does, attributed to the task); one synthesis
per real optimizer step, on the full accumulated task gradients, before clipping. The model is
the tiny Llama of ``tiny_facts.py``, which first memorises random facts and then forgets a few
of them (gradient ascent) while gradient descent on the others keeps them.

The same loop runs unchanged on several processes with ``accelerate launch`` and one of the
config files in ``examples/accelerate/`` (DDP, FSDP2, DeepSpeed ZeRO-2 or ZeRO-3; see the docs
page *Scaling out*). At the end every process prints a digest of the whole parameters (gathered
where sharded): the processes agree when the digests are equal.

Under a DeepSpeed config ``--cpu`` does not apply: DeepSpeed picks its own device (its CPU
accelerator on a machine without GPUs), and on such a machine Accelerate names no process-group
backend under DeepSpeed (each process would then train alone), so `make_accelerator` names gloo.

Run::

    python examples/accelerate_loop.py            # full run
    python examples/accelerate_loop.py --quick    # a smoke-test variant (seconds)
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/accelerate_loop.py --no-cpu
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/accelerate_loop.py --no-cpu
    accelerate launch --config_file examples/accelerate/zero2.yaml examples/accelerate_loop.py
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/accelerate_loop.py
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tiny_facts import accuracy, make_facts, memorise, paired_examples, tiny_llama
from torch.distributed.tensor import DTensor
from transformers import get_linear_schedule_with_warmup

from gradsynth import SynthesizingOptimizer
from gradsynth.integrations.accelerate_tasks import AcceleratedTasks
from gradsynth.integrations.task_batches import TaskPairCollator
from gradsynth.integrations.task_losses import gradient_ascent_loss, nll_loss


def make_accelerator(cpu: bool, accumulation: int) -> Accelerator:
    """``Accelerator(cpu=cpu)``; under a DeepSpeed launch on a machine without GPUs, gloo named."""
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        cpu = False  # cpu=True would switch DeepSpeed off; DeepSpeed chooses its device itself
        if not torch.cuda.is_available():
            # Accelerate names no backend under DeepSpeed without a GPU and then counts 1 process.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(cpu=cpu, gradient_accumulation_steps=accumulation, kwargs_handlers=handlers)


def parameter_digest(model: torch.nn.Module) -> str:
    """A hash of the whole parameters (FSDP2 shards and ZeRO-3 partitions gathered; a collective)."""
    params = list(model.parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_tensor") for p in params):  # ZeRO-3 partitions
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(params)
    digest = hashlib.sha256()
    with gather:
        for p in params:
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            digest.update(whole.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps, for a smoke test")
    parser.add_argument("--rule", default="sago")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (each of 2 micro-batches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="run on the CPU")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n_facts, hidden, pretrain_steps, steps = (16, 32, 60, 3) if args.quick else (64, 64, 150, args.steps)
    accumulation, batch_size = 2, 4

    facts = make_facts(n_facts, 10, 64, args.seed)
    forget, retain = facts[:8], facts[8:]
    model = tiny_llama(64, hidden, 2, args.seed)
    memorise(model, facts, pretrain_steps, 1e-2)
    print(f"memorised: forget {accuracy(model, forget):.1%}, retain {accuracy(model, retain):.1%}")

    accelerator = make_accelerator(args.cpu, accumulation)
    accelerator.print(f"engine: {accelerator.distributed_type.name}, {accelerator.num_processes} process(es)")
    opt = SynthesizingOptimizer(
        torch.optim.AdamW(model.parameters(), lr=2e-3), args.rule, track_geometry=True
    )
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    examples = paired_examples(forget, retain, steps * accumulation * batch_size)
    loader = torch.utils.data.DataLoader(examples, batch_size=batch_size, collate_fn=TaskPairCollator())
    model, optimizer, loader, sched = accelerator.prepare(model, opt, loader, sched)
    tasks = AcceleratedTasks(accelerator, optimizer)

    model.train()
    cos_gr = []
    for batch in loader:
        with accelerator.accumulate(model):
            tasks.backward_forget(gradient_ascent_loss(model, batch["forget"]))
            tasks.backward_retain(nll_loss(model, batch["retain"]))
            if tasks.synthesize():  # True on the last micro-batch of a step only
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                cos_gr.append(opt.geometry.cos_gr)
            optimizer.step()  # AcceleratedOptimizer: a no-op between sync points
            sched.step()
            optimizer.zero_grad()

    model = accelerator.unwrap_model(model)  # under FSDP2 still sharded: every rank evaluates
    accelerator.print(
        f"after {len(cos_gr)} optimizer steps ({len(loader)} micro-batches), rule {args.rule}: "
        f"forget {accuracy(model, forget):.1%}, retain {accuracy(model, retain):.1%}, "
        f"mean cos(g, r) {sum(cos_gr) / len(cos_gr):.3f}"
    )
    digest = parameter_digest(model)
    print(f"process {accelerator.process_index}: parameters {digest}", flush=True)
    # Leaving the process group to the interpreter's teardown lets gloo's worker threads die
    # joinable: now and then a process aborts ("terminate called without an active exception",
    # SIGABRT) after all its work is done, and the launcher reports the run as failed.
    accelerator.end_training()


if __name__ == "__main__":
    main()
