"""The data layer: every source kind and benchmark schema, built here in tmp folders (no download).

Sources: JSONL, Parquet, ``save_to_disk`` of a Dataset and of a DatasetDict (``FOLDER:SPLIT``), a
folder of data files, and ``hub:ORG/NAME[/CONFIG][:SPLIT]`` from a ``datasets`` cache and from a
Hub cache laid out here as the libraries lay them out. Schemas: TOFU, MUSE (knowmem, raw),
WMDP corpora, RWKU probes. Then the chat-template encoding with answer-only labels, the
forget/retain pairing, `SynthesizingTrainer` on the result, and the command line's one-line refusals.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from helpers import without_progress
from test_answers import _tokenizer

from gradsynth.unlearning.chat import chat_prompt
from gradsynth.unlearning.data import DataError, examples_from_dataset, load_examples
from gradsynth.unlearning.data_sources import parse_source
from gradsynth.unlearning.encoding import Example, prompt_of
from gradsynth.unlearning.task_datasets import PairWithRetain, encode_examples, pair_tasks, unlearning_dataset

datasets = pytest.importorskip("datasets")

TOFU = {"question": ["what is x ?", "is x paris ?"], "answer": ["paris", "x"]}
RWKU = {
    "subject": ["x", "x"],
    "query": ["x is ___ .", "what is x ?"],
    "answer": ["paris", "paris"],
    "level": ["1", "2"],
    "type": ["cloze", "simple question"],
}
WMDP = {"title": ["t"], "abstract": ["a"], "text": ["what is x"], "doi": ["d"]}


def _one_line(err: Exception, *parts: str) -> None:
    text = str(err)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text


# ----- files and folders, each benchmark's schema ---------------------------------------------


def test_tofu_from_jsonl_and_parquet_give_the_same_examples(tmp_path):
    jsonl = tmp_path / "tofu.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(*TOFU.values(), strict=True))
    )
    parquet = tmp_path / "tofu.parquet"
    datasets.Dataset.from_dict(TOFU).to_parquet(str(parquet))
    expected = [Example(prompt_of("what is x ?"), "paris"), Example(prompt_of("is x paris ?"), "x")]
    assert load_examples(jsonl) == expected
    assert load_examples(parquet) == expected


def test_save_to_disk_dataset_and_dataset_dict_splits(tmp_path):
    muse = datasets.DatasetDict(
        {
            "forget": datasets.Dataset.from_dict({"question": ["what is x ?"], "answer": ["paris"]}),
            "retain1": datasets.Dataset.from_dict({"question": ["is x ?"], "answer": ["x"]}),
        }
    )
    muse.save_to_disk(str(tmp_path / "knowmem"))
    assert load_examples(f"{tmp_path}/knowmem:retain1") == [Example(prompt_of("is x ?"), "x")]
    assert load_examples(f"{tmp_path}/knowmem:forget") == [Example(prompt_of("what is x ?"), "paris")]
    with pytest.raises(DataError) as err:
        load_examples(tmp_path / "knowmem", "--forget")
    _one_line(err.value, "--forget", "has the splits ['forget', 'retain1']", ":forget")
    with pytest.raises(DataError) as err:
        load_examples(f"{tmp_path}/knowmem:retain9", "--retain")
    _one_line(err.value, "no split 'retain9'", "['forget', 'retain1']")
    # One Dataset (a WMDP corpus: the text column, the others ignored).
    datasets.Dataset.from_dict(WMDP).save_to_disk(str(tmp_path / "wmdp"))
    assert load_examples(tmp_path / "wmdp") == [Example("what is x")]
    with pytest.raises(DataError) as err:
        load_examples(f"{tmp_path}/wmdp:train")
    _one_line(err.value, "holds one Dataset", "drop ':train'")
    # A DatasetDict of one split needs no split name.
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(TOFU)}).save_to_disk(str(tmp_path / "one"))
    assert len(load_examples(tmp_path / "one")) == 2


def test_a_folder_of_data_files_and_its_splits(tmp_path):
    folder = tmp_path / "rwku"
    folder.mkdir()
    datasets.Dataset.from_dict(RWKU).to_json(str(folder / "test.jsonl"))
    datasets.Dataset.from_dict({k: v[:1] for k, v in RWKU.items()}).to_json(str(folder / "train.jsonl"))
    rwku = load_examples(f"{folder}:test")
    assert rwku == [Example(prompt_of("x is ___ ."), "paris"), Example(prompt_of("what is x ?"), "paris")]
    assert load_examples(f"{folder}:train") == rwku[:1]


def test_a_path_that_exists_is_taken_literally_colons_included(tmp_path):
    odd = tmp_path / "a:b.jsonl"
    odd.write_text(json.dumps({"text": "what is x"}) + "\n")
    assert load_examples(odd) == [Example("what is x")]
    assert parse_source(odd).kind == "file"
    with pytest.raises(DataError) as err:
        load_examples(f"{odd}:train")
    _one_line(err.value, "goes with a datasets folder or a hub: id, not a file")


def test_columns_maps_another_schema_and_unknown_columns_name_what_was_found(tmp_path):
    verbmem = {"prompt": ["what is"], "gt": ["x"]}  # MUSE verbmem's columns
    table = datasets.Dataset.from_dict(verbmem)
    mapped = examples_from_dataset(table, columns={"question": "prompt", "answer": "gt"})
    assert mapped == [Example(prompt_of("what is"), "x")]
    with pytest.raises(DataError) as err:
        examples_from_dataset(table, "--forget data")
    _one_line(
        err.value, "has columns ['gt', 'prompt']", "'question' and 'answer'", "'query' and 'answer'", "'text'"
    )
    with pytest.raises(DataError) as err:
        examples_from_dataset(table, "x", columns={"question": "prompt", "answer": "answer"})
    _one_line(err.value, "no column 'answer'", "['gt', 'prompt']")
    with pytest.raises(DataError) as err:
        examples_from_dataset(datasets.Dataset.from_dict({"text": []}), "--retain r")
    _one_line(err.value, "--retain r: the set has no rows")


# ----- Hub ids, from the local caches only ----------------------------------------------------


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty ``datasets`` and Hub caches of this test (the machine's own are never looked at)."""
    import huggingface_hub.constants

    cache, hub = tmp_path / "datasets-cache", tmp_path / "hub-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    return cache, hub


def _datasets_cache_entry(cache: Path, repo: str, config: str, table: dict, tmp: Path) -> None:
    """What ``load_dataset(repo, config)`` leaves in the datasets cache (org___name/config/version/hash)."""
    from datasets.packaged_modules.json.json import Json

    rows = tmp / f"{config}.jsonl"
    datasets.Dataset.from_dict(table).to_json(str(rows))
    builder = Json(cache_dir=str(tmp / "build"), dataset_name=repo.split("/")[1], config_name=config,
                   data_files={"train": str(rows)})  # fmt: skip
    builder.download_and_prepare()
    org, name = repo.split("/")
    shutil.copytree(builder.cache_dir, cache / f"{org}___{name.lower()}" / config / "0.0.0" / "0123abcd")


def _hub_cache_entry(hub: Path, repo: str, files: dict[str, dict], card: str) -> None:
    """What ``hf download --repo-type dataset repo`` leaves in the Hub cache: a snapshot and refs/main."""
    commit = "0" * 39 + "1"
    repo_dir = hub / f"datasets--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for name, table in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict(table).to_json(str(snapshot / name))
    (snapshot / "README.md").write_text(card)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)


RWKU_CARD = """---
configs:
- config_name: forget_level1
  data_files:
  - split: test
    path: forget_level1/test.jsonl
- config_name: utility
  data_files:
  - split: train
    path: utility/train.jsonl
  - split: test
    path: utility/test.jsonl
---
"""


def test_a_hub_id_from_the_hub_cache_offline(caches):
    _, hub = caches
    files = {"forget_level1/test.jsonl": RWKU, "utility/train.jsonl": TOFU, "utility/test.jsonl": TOFU}
    _hub_cache_entry(hub, "jinzhuoran/RWKU", files, RWKU_CARD)
    probes = load_examples("hub:jinzhuoran/RWKU/forget_level1")
    assert probes[0] == Example(prompt_of("x is ___ ."), "paris")
    assert load_examples("hub:jinzhuoran/RWKU/forget_level1:test") == probes
    assert len(load_examples("hub:jinzhuoran/RWKU/utility:train")) == 2
    with pytest.raises(DataError) as err:
        load_examples("hub:jinzhuoran/RWKU/utility", "--eval probes")
    _one_line(err.value, "--eval probes hub:jinzhuoran/RWKU/utility: has the splits ['test', 'train']")


def test_a_hub_id_not_in_the_caches_is_one_line_naming_the_fix(caches):
    with pytest.raises(DataError) as err:
        load_examples("hub:cais/wmdp-corpora/bio-retain-corpus", "--retain")
    _one_line(err.value, "--retain hub:cais/wmdp-corpora/bio-retain-corpus: not in this machine's caches",
              "hf download --repo-type dataset cais/wmdp-corpora")  # fmt: skip
    for bad in ("hub:", "hub:TOFU", "hub:a/b/c/d", "hub:a/b:"):
        with pytest.raises(DataError) as err:
            load_examples(bad)
        _one_line(err.value, "hub:ORG/NAME")


# ----- encoding, pairing, the trainer -----------------------------------------------------------


def test_encoding_in_chat_and_plain_format_labels_the_answer_only():
    tok = _tokenizer()
    examples = [Example(prompt_of("what is x ?"), "paris"), Example("what is x")]
    chat = encode_examples(examples, tok)  # the tokenizer has a template: chat by default
    prompt_ids = tok(chat_prompt(tok, "what is x ?"), add_special_tokens=True)["input_ids"]
    paris, eos = tok.convert_tokens_to_ids("paris"), tok.eos_token_id
    assert chat[0]["input_ids"] == [*prompt_ids, paris, eos]
    assert chat[0]["labels"] == [-100] * len(prompt_ids) + [paris, eos]
    assert chat[0]["attention_mask"] == [1] * (len(prompt_ids) + 2)
    text_ids = [*tok("what is x")["input_ids"], eos]
    assert chat[1]["input_ids"] == text_ids and chat[1]["labels"] == text_ids  # text: every token
    plain = encode_examples(examples[:1], tok, prompt_format="plain")
    plain_prompt = tok(prompt_of("what is x ?"))["input_ids"]
    assert plain[0]["input_ids"][: len(plain_prompt)] == plain_prompt
    assert plain[0]["labels"][len(plain_prompt) :] == plain[0]["input_ids"][len(plain_prompt) :]
    full = encode_examples(examples[:1], tok, loss_scope="full")
    assert full[0]["labels"] == full[0]["input_ids"] == chat[0]["input_ids"]
    with pytest.raises(DataError, match="no chat template"):
        encode_examples(examples, _tokenizer(template=None), prompt_format="chat")


def _rows(n: int) -> object:
    return datasets.Dataset.from_dict(
        {"input_ids": [[i] for i in range(n)], "labels": [[i] for i in range(n)]}
    )


@pytest.mark.parametrize(("forget", "retain"), [(7, 3), (3, 7), (4, 4)])
def test_pairing_is_one_pass_over_forget_with_retain_cycled_in_a_seeded_order(forget, retain):
    pairs = pair_tasks(_rows(forget), _rows(retain), seed=3)
    assert len(pairs) == forget
    assert [row["forget"]["input_ids"][0] for row in pairs] == list(range(forget))
    drawn = [row["retain"]["input_ids"][0] for row in pairs]
    counts = Counter(drawn)
    assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == min(forget, retain)
    assert drawn == [PairWithRetain(_rows(retain), seed=3).retain_index(i) for i in range(forget)]
    assert drawn == [
        row["retain"]["input_ids"][0] for row in pair_tasks(_rows(forget), _rows(retain), seed=3)
    ]
    if retain > 2:
        others = {tuple(r["retain"]["input_ids"][0] for r in pair_tasks(_rows(forget), _rows(retain), seed=s))
                  for s in range(4)}  # fmt: skip
        assert len(others) > 1  # the seed matters
    with pytest.raises(DataError, match="retain set has no rows"):
        pair_tasks(_rows(2), _rows(0))


@pytest.mark.parametrize("forget_loss", ["ga", "idkdpo"])
def test_synthesizing_trainer_takes_the_paired_dataset_directly(tmp_path, forget_loss):
    import math

    import torch
    from hf_helpers import tiny_llama, training_args

    from gradsynth.integrations.hf_trainer import SynthesizingTrainer
    from gradsynth.integrations.task_batches import TaskPairCollator
    from gradsynth.unlearning.trainer_losses import with_idk_answers

    tok = _tokenizer()
    forget, retain = tmp_path / "f.jsonl", tmp_path / "r"
    rows = [{"question": q, "answer": "paris"} for q in ("what is x ?", "x ?")]
    forget.write_text("".join(json.dumps(row) + "\n" for row in rows))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(RWKU)}).save_to_disk(str(retain))
    if forget_loss == "ga":
        pairs = unlearning_dataset(forget, f"{retain}:test", tok, seed=0)
    else:  # the refusals go on the encoded forget side, before pairing (as the docs say)
        encoded = encode_examples(load_examples(forget), tok)
        with_idk = datasets.Dataset.from_list(with_idk_answers(list(encoded), tok))
        pairs = pair_tasks(with_idk, encode_examples(load_examples(f"{retain}:test"), tok))
        assert "idk_input_ids" in pairs[0]["forget"]
    model = tiny_llama()
    batch = TaskPairCollator()(list(pairs))
    with torch.no_grad():  # the hand-computed first-step losses
        # GA: -NLL of the forget batch; IdkDPO at the reference itself: -(2/beta) log sigmoid(0) = 20 ln 2
        expected = -model(**batch["forget"]).loss.item() if forget_loss == "ga" else 20 * math.log(2)
        retain_loss = model(**batch["retain"]).loss.item()
    args = training_args(tmp_path / "out", max_steps=1, learning_rate=1e-3, per_device_train_batch_size=2)
    trainer = SynthesizingTrainer(model, args, train_dataset=pairs, rule="sago", forget_loss=forget_loss)
    trainer.train()
    log = next(entry for entry in trainer.state.log_history if "forget_loss" in entry)
    assert log["forget_loss"] == pytest.approx(expected, rel=1e-5)
    assert log["retain_loss"] == pytest.approx(retain_loss, rel=1e-5)


# ----- the command line reads the same sources ----------------------------------------------------


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A random 2-layer Llama whose tokenizer has a chat template (so --prompt-format defaults to chat)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("chat-model")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _unlearn(model: Path, out: Path, *data: str) -> int:
    from gradsynth.cli import main

    argv = ["unlearn", "--model", str(model), *data, "--steps", "1", "--out", str(out), "--no-progress"]
    return main(argv)


def test_unlearn_reads_a_dataset_dict_split_a_hub_id_and_a_folder(chat_model, caches, tmp_path):
    cache, _ = caches
    datasets.DatasetDict(
        {"forget": datasets.Dataset.from_dict(TOFU), "retain1": datasets.Dataset.from_dict(TOFU)}
    ).save_to_disk(str(tmp_path / "knowmem"))
    _datasets_cache_entry(cache, "locuslab/TOFU", "retain90", TOFU, tmp_path)
    datasets.Dataset.from_dict(RWKU).save_to_disk(str(tmp_path / "probes"))
    out = tmp_path / "out"
    data = ["--forget", f"{tmp_path}/knowmem:forget", "--retain", "hub:locuslab/TOFU/retain90"]
    assert _unlearn(chat_model, out, *data, "--eval", f"probes={tmp_path}/probes") == 0
    task = json.loads((out / "report.json").read_text())["settings"]["task"]
    assert task["sizes"] == {"forget": 2, "retain": 2, "probes": 2}
    assert task["prompt_format"] == "chat"
    assert (
        task["forget_file"] == f"{tmp_path}/knowmem:forget"
        and task["retain_file"] == "hub:locuslab/TOFU/retain90"
    )


@pytest.mark.parametrize(
    ("forget", "message"),
    [
        ("{tmp}/verbmem", "has columns ['gt', 'prompt']; it needs 'question' and 'answer'"),
        ("{tmp}/knowmem:retain9", "no split 'retain9'; give one of ['forget', 'retain1']"),
        ("{tmp}/knowmem", "has the splits ['forget', 'retain1']; add one"),
        ("hub:locuslab/TOFU/forget10", "not in this machine's caches"),
        ("{tmp}/empty", "the set has no rows"),
    ],
)
def test_bad_sources_are_one_line_exit_2_and_nothing_written(
    chat_model, caches, tmp_path, capsys, forget, message
):
    from gradsynth.cli import main  # noqa: F401  (imported before the files, as a user would run it)

    datasets.Dataset.from_dict({"prompt": ["what is"], "gt": ["x"]}).save_to_disk(str(tmp_path / "verbmem"))
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "empty"))
    datasets.DatasetDict(
        {"forget": datasets.Dataset.from_dict(TOFU), "retain1": datasets.Dataset.from_dict(TOFU)}
    ).save_to_disk(str(tmp_path / "knowmem"))
    retain = tmp_path / "r.jsonl"
    retain.write_text(json.dumps({"question": "what is x ?", "answer": "paris"}) + "\n")
    out = tmp_path / "out"
    capsys.readouterr()
    assert _unlearn(chat_model, out, "--forget", forget.format(tmp=tmp_path), "--retain", str(retain)) == 2
    err = without_progress(capsys.readouterr().err)
    assert err.count("\n") == 1 and err.startswith("gradsynth: error: --forget "), err
    assert message in err, err
    assert not out.exists()


def test_out_may_not_be_the_datasets_folder_a_split_is_read_from(chat_model, tmp_path, capsys):
    from gradsynth.cli import main

    folder = tmp_path / "knowmem"
    datasets.DatasetDict({"forget": datasets.Dataset.from_dict(TOFU)}).save_to_disk(str(folder))
    before = sorted(p.name for p in folder.rglob("*"))
    capsys.readouterr()  # the progress bar of save_to_disk above
    argv = [
        "unlearn",
        "--model",
        str(chat_model),
        "--forget",
        f"{folder}:forget",
        "--retain",
        f"{folder}:forget",
    ]
    assert main([*argv, "--steps", "1", "--out", str(folder), "--overwrite", "--no-progress"]) == 2
    err = without_progress(capsys.readouterr().err)
    assert err.count("\n") == 1 and "is --forget" in err and "would delete" in err, err
    assert sorted(p.name for p in folder.rglob("*")) == before
