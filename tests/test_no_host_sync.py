"""No host sync in the synthesis: ``SynthesizingOptimizer.step()`` never reads a gradient's values
on the host where the gradient can live on an accelerator.

Two checks, for every rule, with and without geometry, with and without streaming:

- at run time, the task gradients are `HostReadGuard` tensors, a subclass whose
  ``__torch_function__`` raises on every host read (``item``, ``tolist``, ``bool``/``float``/
  ``int`` of a tensor, ``numpy``, ``cpu``, ``torch.equal``, ...), so a Python branch on a tensor
  value raises too. A tensor subclass is not a plain tensor, so it takes the path that DTensor
  shards and every non-fused case take: the eager rules with their float64 tensor sums. The fused
  kernels on a GPU are checked by ``tests/test_cuda.py`` with ``torch.cuda.set_sync_debug_mode``;
- statically, every call of ``.item()``, ``.tolist()``, ``.numpy()``, ``.cpu()`` and of
  ``float``/``int``/``bool`` on a non-literal in ``gradsynth/rules`` and ``gradsynth/optim`` must
  be listed in `ALLOWED` with the reason it cannot read an accelerator's memory (a Python value,
  a plain CPU tensor checked first, or a function outside ``step()``). A new call fails until it
  is reviewed and listed; a listed call that is gone fails too, so the list stays exact.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path

import pytest
import torch
from conftest import RULES

import gradsynth
from gradsynth import SynthesizingOptimizer

ROOT = Path(gradsynth.__file__).resolve().parent

#: Methods and functions whose result is a host value computed from a tensor's contents.
HOST_READS = frozenset(
    {
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "__complex__",
        "__format__",
        "__array__",
        "__repr__",
        "equal",
        "allclose",
        "is_nonzero",
    }
)


class HostRead(AssertionError):
    """A tensor's values were read on the host inside a checked block."""


class HostReadGuard(torch.Tensor):
    """A tensor that raises `HostRead` on any host read while `armed` is set (results stay guards)."""

    armed = False

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if cls.armed and name in HOST_READS:
            raise HostRead(f"host read of a gradient: {name}")
        return super().__torch_function__(func, types, args, kwargs or {})


@contextlib.contextmanager
def armed():
    HostReadGuard.armed = True
    try:
        yield
    finally:
        HostReadGuard.armed = False


def test_the_guard_catches_every_kind_of_host_read():
    t = torch.tensor([1.0, -2.0]).as_subclass(HostReadGuard)
    reads = [
        lambda: t[0].item(),
        lambda: t.tolist(),
        lambda: bool(t[0] > 0),
        lambda: float(t[0]),
        lambda: int(t[0]),
        lambda: t.numpy(),
        lambda: t.cpu(),
        lambda: torch.equal(t, t),
        lambda: [0, 1][t[0].long()],
        lambda: f"{t.sum():.3f}",
        lambda: 1 if t.sum() < 0 else 0,
    ]
    with armed():
        for read in reads:
            with pytest.raises(HostRead):
                read()
        (t * 2).sum()  # arithmetic stays on the device


SHAPES = [(6, 5), (7,), (3, 4)]


def _gradients(dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    grads[0][0] = 0.0  # zeros are never conflicts
    return grads


def _step(rule, dtype, *, geometry, streaming, guard):
    """One step of SGD(lr=1) from zero params; returns (update, geometry) read after the step."""
    params = [torch.zeros(s, dtype=dtype, requires_grad=True) for s in SHAPES]
    opt = SynthesizingOptimizer(
        torch.optim.SGD(params, lr=1.0, foreach=False),
        rule,
        alpha=0.75,
        gamma=1.5,
        track_geometry=geometry,
        streaming=streaming,
    )
    forget, retain = _gradients(dtype, 1), _gradients(dtype, 2)
    wrap = (lambda t: t.as_subclass(HostReadGuard)) if guard else (lambda t: t)
    for p, f in zip(params, forget, strict=True):
        p.grad = wrap(f.clone())
    opt.backward_forget(None)
    if streaming:
        # The second task's backward synthesizes inside its hooks; its own gradients come from
        # autograd (plain tensors) and meet the first task's guarded stash there.
        loss = sum((p * r).sum() for p, r in zip(params, retain, strict=True))
        with armed() if guard else contextlib.nullcontext():
            opt.backward_retain(loss)
            opt.step()
    else:
        for p, r in zip(params, retain, strict=True):
            p.grad = wrap(r.clone())
        opt.backward_retain(None)
        with armed() if guard else contextlib.nullcontext():
            opt.step()
    update = [-p.detach().as_subclass(torch.Tensor).clone() for p in params]
    return update, opt.geometry


STREAMABLE = ["sago", "sago_prefer_retain", "pcgrad", "sum"]
CASES = [(rule, False) for rule in RULES] + [(rule, True) for rule in STREAMABLE]


@pytest.mark.parametrize("geometry", [False, True], ids=["plain", "geometry"])
@pytest.mark.parametrize(("rule", "streaming"), CASES)
def test_step_reads_no_gradient_on_the_host(rule, streaming, geometry):
    for dtype in (torch.float32, torch.bfloat16):
        got, got_geometry = _step(rule, dtype, geometry=geometry, streaming=streaming, guard=True)
        # The guarded step computed the update the plain step computes (it did the work).
        want, want_geometry = _step(rule, dtype, geometry=geometry, streaming=streaming, guard=False)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=2e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
        if geometry:
            assert got_geometry is not None and want_geometry is not None
            assert got_geometry.cos_gr == pytest.approx(want_geometry.cos_gr, rel=1e-3, abs=1e-6)


def test_a_rule_that_branches_on_a_value_is_caught():
    """The check can fail: a custom rule deciding in Python on ``<f, r>`` raises inside step()."""

    def branching(f, r, *, alpha, gamma):
        return alpha * r if (f * r).sum() < 0 else gamma * f + alpha * r

    params = [torch.zeros(4, requires_grad=True)]
    opt = SynthesizingOptimizer(torch.optim.SGD(params, lr=1.0), branching)
    params[0].grad = torch.tensor([1.0, -1.0, 2.0, 0.5]).as_subclass(HostReadGuard)
    opt.backward_forget(None)
    params[0].grad = torch.tensor([-1.0, 1.0, 2.0, 0.5]).as_subclass(HostReadGuard)
    opt.backward_retain(None)
    with armed(), pytest.raises(HostRead, match="__bool__"):
        opt.step()


# ----- the static check -----------------------------------------------------------------------

_METHODS = {"item", "tolist", "numpy", "cpu"}
_CASTS = {"float", "int", "bool"}
_CPU = "reads a plain CPU tensor (checked just before): waiting for nothing"
_SETTING = "a Python setting, not a tensor"

#: (file under gradsynth/, function, call) -> why it reads no accelerator's memory in step().
_LOAD_CHECK = "the C library's load-time check: Python test values on the CPU, once per process"
ALLOWED: dict[tuple[str, str, str], str] = {
    ("rules/native/__init__.py", "_check_geometry", "acc.tolist()"): _LOAD_CHECK,
    (
        "rules/native/__init__.py",
        "_check_geometry",
        "float(sum((x * y < 0 for x, y in zip(a, b, strict=True))))",
    ): _LOAD_CHECK,
    ("rules/native/__init__.py", "_check_geometry", "t.double().tolist()"): _LOAD_CHECK,
    ("rules/native/__init__.py", "_check_rule_geometry", "acc.tolist()"): _LOAD_CHECK,
    (
        "rules/native/__init__.py",
        "_check_rule_geometry",
        "float(sum((x * y < 0 for x, y in zip(a, b, strict=True))))",
    ): _LOAD_CHECK,
    ("rules/native/__init__.py", "_check_rule_geometry", "t.double().tolist()"): _LOAD_CHECK,
    ("rules/weighted_sum.py", "weighted_sum", "float(weight)"): (
        "a plain CPU tensor (checked first: type and device), as the fused path reads it"
    ),
    ("optim/geometry.py", "GeometryAccumulator.result", "total.tolist()"): (
        "outside step(): the `geometry` property, documented as one host sync per device"
    ),
    ("optim/synthesizing_optimizer.py", "_check_weight", "float(value)"): "alpha/gamma, Python numbers",
    ("optim/synthesizing_optimizer.py", "adopt_settings", "bool(value)"): _SETTING,
    ("optim/synthesizing_optimizer.py", "SynthesizingOptimizer.__init__", "bool(track_geometry)"): _SETTING,
    ("optim/synthesizing_optimizer.py", "SynthesizingOptimizer.__init__", "bool(streaming)"): _SETTING,
    (
        "optim/synthesizing_optimizer.py",
        "SynthesizingOptimizer.load_state_dict",
        "bool(settings.get('track_geometry', False))",
    ): _SETTING,
    ("optim/task_gradients.py", "TaskGradients.holds", "bool(self._stash[task])"): "a dict, not a tensor",
    ("rules/kernels/policy.py", "_changed", "int(min_numel)"): _SETTING,
    ("rules/kernels/policy.py", "_changed", "int(min_step_numel)"): _SETTING,
    ("rules/kernels/select.py", "select_linear", "float(weight)"): (
        "only where retain.device.type == 'cpu' (a tensor weight off the CPU is applied as a tensor), "
        "or after c_takes: plain CPU gradients, and the weight on their device (pcgrad_global moves it)"
    ),
    ("rules/kernels/ops.py", "_floats", "pair[0].item()"): (
        "called from host_dots and pcgrad_weight, both CPU only (scope_inner_products checks; "
        "pcgrad_weight returns off the CPU)"
    ),
    ("rules/kernels/ops.py", "_floats", "pair[1].item()"): "as above",
    ("rules/native/__init__.py", "_check", "f.tolist()"): "the C kernels' load-time check, CPU tensors",
    ("rules/native/__init__.py", "_check", "r.tolist()"): "as above",
    ("rules/native/__init__.py", "_bf16_supported", "bool(library.gradsynth_bf16_supported())"): (
        "a C function's int result"
    ),
    ("rules/native/__init__.py", "_check_bf16", "f.double().tolist()"): "load-time check, CPU tensors",
    ("rules/native/__init__.py", "_check_bf16", "r.double().tolist()"): "as above",
    ("rules/native/__init__.py", "_check_bf16", "out.tolist()"): "as above",
    ("rules/native/__init__.py", "_check_bf16", "want.tolist()"): "as above",
    ("rules/native/__init__.py", "apply_bf16", "float(alpha)"): (
        "the C kernels take plain CPU tensors only (fused checks before calling)"
    ),
    ("rules/native/__init__.py", "apply_bf16", "float(gamma)"): "gamma, a Python number",
}


class _HostReadCalls(ast.NodeVisitor):
    """Collects ``(file, function, call)`` for each call that could read a tensor on the host."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.scope: list[str] = []
        self.found: set[tuple[str, str, str]] = set()

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        method = isinstance(func, ast.Attribute) and func.attr in _METHODS
        cast = (
            isinstance(func, ast.Name)
            and func.id in _CASTS
            and bool(node.args)
            and not isinstance(node.args[0], ast.Constant)
        )
        if method or cast:
            self.found.add((self.where, ".".join(self.scope), ast.unparse(node)))
        self.generic_visit(node)


def host_read_calls() -> set[tuple[str, str, str]]:
    """Every call in the synthesis layers that could read a tensor on the host, by function."""
    found: set[tuple[str, str, str]] = set()
    for path in sorted([*(ROOT / "rules").rglob("*.py"), *(ROOT / "optim").glob("*.py")]):
        visitor = _HostReadCalls(path.relative_to(ROOT).as_posix())
        visitor.visit(ast.parse(path.read_text()))
        found |= visitor.found
    return found


def test_every_host_read_in_the_synthesis_layers_is_reviewed():
    found = host_read_calls()
    new = sorted(found - ALLOWED.keys())
    assert not new, (
        "new host reads in gradsynth/rules or gradsynth/optim (a host sync per call on a GPU); "
        f"remove them, or gate them to plain CPU tensors and list them in ALLOWED with why: {new}"
    )
    gone = sorted(ALLOWED.keys() - found)
    assert not gone, f"ALLOWED lists calls that no longer exist; remove them: {gone}"
