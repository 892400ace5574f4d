"""PEFT / LoRA: only the adapter parameters train, and the wrapper manages exactly those."""

from __future__ import annotations

import pytest
import torch
from hf_helpers import fresh_accelerate_state, paired_examples, params_of, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from gradsynth.integrations.hf_trainer import SynthesizingTrainer  # noqa: E402

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
_ = fresh_accelerate_state


# peft itself still asks the model the pre-v5 question.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_lora_trains_only_the_adapters(tmp_path, checkpointing):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_llama(), config)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    before = params_of(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        activation_checkpointing=checkpointing,
    )
    trainer = SynthesizingTrainer(model, args, train_dataset=paired_examples(4), rule="sago_prefer_retain")
    trainer.train()

    opt = trainer.synthesizing_optimizer
    managed = {id(p) for group in opt.param_groups for p in group["params"]}
    assert managed == {id(p) for n, p in model.named_parameters() if n in adapters}
    # The last synthesis covered every adapter coordinate and nothing else.
    assert opt.geometry.numel == sum(p.numel() for n, p in model.named_parameters() if n in adapters)
    after = params_of(model)
    for name, p in model.named_parameters():
        if name in adapters:
            assert not torch.equal(before[name], after[name]), name
        else:
            assert torch.equal(before[name], after[name]), name
            assert p.grad is None, name
