"""What ran: the implementation chosen for each (operation, dtype, device), and each compilation.

`record` is called by the selector's caller (`gradsynth.rules.kernels.ops`) with the
implementation that actually wrote the result, after any fallback (a compiled kernel that failed
to compile and left the work to the eager one records ``"eager"``). `status` reports, as strings:

- ``"<operation>[<dtype>, <device>]"``: the implementation that ran last, by name (see
  `gradsynth.rules.kernels.select.IMPLEMENTATIONS`), e.g. ``"sago[bfloat16, cpu]": "C kernel"``;
  ``"C kernel with the geometry"`` where the float32 one-loop kernel wrote the update and took
  the geometry sums (`gradsynth.rules.geometry_sums.fused_measured`);
- ``"<compiled variant>[<dtype>, <device>]"``: ``"compiled"`` or ``"failed (eager fallback)"``
  for each ``torch.compile`` kernel tried (e.g. ``sago_into_retain``);
- ``"geometry[<dtype>, <device>]"``: how the geometry sums were taken (operation ``geometry``).

`history` keeps every implementation each operation used, in the order first used.
"""

from __future__ import annotations

import torch

# (operation, dtype, device type) -> the implementation that ran last / every one, first use first.
_last: dict[tuple[str, torch.dtype, str], str] = {}
_seen: dict[tuple[str, torch.dtype, str], list[str]] = {}
#: (compiled variant, dtype, device type) -> compiled and ran (True) or failed to compile (False).
compiled: dict[tuple[str, torch.dtype, str], bool] = {}


def record(operation: str, dtype: torch.dtype, device: str, implementation: str) -> None:
    """Note that ``implementation`` ran ``operation`` on ``dtype`` tensors on ``device``."""
    key = (operation, dtype, device)
    if _last.get(key) is not implementation:
        _last[key] = implementation
        seen = _seen.setdefault(key, [])
        if implementation not in seen:
            seen.append(implementation)


def _label(name: str, dtype: torch.dtype, device: str) -> str:
    return f"{name}[{str(dtype).removeprefix('torch.')}, {device}]"


def status() -> dict[str, str]:
    """What ran so far in this process, as ``{"<name>[<dtype>, <device>]": how}``.

    For each operation (``sago``, ``prefer_retain``, ``linear``, ``dots``, ``geometry``) the
    implementation that ran last (``"C kernel"``, ``"compiled"``, ``"eager"``, ...; see
    `history` for all of them), and for each ``torch.compile`` kernel tried (``sago_into_retain``,
    ...) ``"compiled"`` or ``"failed (eager fallback)"``. Also ``gradsynth.rules.fused.status``.
    """
    tried = {_label(*key): "compiled" if ok else "failed (eager fallback)" for key, ok in compiled.items()}
    return tried | {_label(*key): how for key, how in _last.items()}


def history() -> dict[tuple[str, torch.dtype, str], tuple[str, ...]]:
    """``(operation, dtype, device type) -> implementations used``, in the order first used."""
    return {key: tuple(names) for key, names in _seen.items()}


def clear() -> None:
    """Forget what ran (not the compiled kernels themselves); for tests and benchmarks."""
    _last.clear()
    _seen.clear()
    compiled.clear()
