"""``SynthesizingOptimizer``: the optimizer shell around the pure rules.

Each step collects two task gradients, forget ``f`` and retain ``r``, synthesizes one update
gradient ``g = rule(f, r; alpha, gamma)`` per parameter group, writes it into ``p.grad`` and
hands over to the wrapped optimizer, which never knows the difference.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from gradsynth.optim.combine import Group, Synthesis, synthesize
from gradsynth.optim.geometry import GeometryAccumulator, GradientGeometry
from gradsynth.optim.streaming import StreamingBackward, check_streamable
from gradsynth.optim.task_gradients import FORGET, RETAIN, TaskGradients, other_task
from gradsynth.rules.base import Rule
from gradsynth.rules.registry import RuleLike, get_rule

#: Version of the ``"gradsynth"`` entry in `SynthesizingOptimizer.state_dict`.
STATE_VERSION = 1


def _check_weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be finite and non-negative (it weights a gradient the rules compare by sign), "
            f"got {value}"
        )
    return value


def _rule_name(rule: Rule) -> str:
    return rule.name or type(rule).__name__


#: The wrapper's own settings that a checkpoint carries (rule by name).
SAVED_SETTINGS = ("rule", "alpha", "gamma", "track_geometry")


def optimizer_settings(optimizer: SynthesizingOptimizer) -> dict[str, Any]:
    """The settings a checkpoint of ``optimizer`` records, as its ``"gradsynth"`` entry holds them."""
    return {
        "rule": _rule_name(optimizer.rule),
        "alpha": optimizer.alpha,
        "gamma": optimizer.gamma,
        "track_geometry": optimizer.track_geometry,
    }


def adopt_settings(optimizer: SynthesizingOptimizer, settings: dict[str, Any]) -> None:
    """Set some of `SAVED_SETTINGS` on ``optimizer`` (a rule by name), without a warning."""
    for name, value in settings.items():
        if name == "rule" and value == _rule_name(optimizer.rule):
            continue  # keep the object: an unregistered rule of the same name cannot be looked up
        setattr(optimizer, name, bool(value) if name == "track_geometry" else value)


def _warn_on_changed_settings(optimizer: SynthesizingOptimizer, saved: dict[str, Any]) -> None:
    """Loading a checkpoint replaces the wrapper's settings (as it replaces ``lr``): say so, naming
    both values, when it replaces one that was set away from its default. A default-built wrapper
    (the usual way to restore) takes the checkpoint's settings silently."""
    current = optimizer_settings(optimizer)
    signature = inspect.signature(SynthesizingOptimizer.__init__).parameters
    changed = [
        f"{name}={current[name]!r} -> {saved[name]!r}"
        for name in SAVED_SETTINGS
        if name in saved and saved[name] != current[name] != signature[name].default
    ]
    if changed:
        warnings.warn(
            f"load_state_dict: the checkpoint's settings replace this optimizer's ({', '.join(changed)}); "
            "to keep your own, set them after loading (opt.rule = ..., opt.alpha = ...)",
            UserWarning,
            stacklevel=3,
        )


class SynthesizingOptimizer(torch.optim.Optimizer):
    r"""Wraps any optimizer so that each step follows a synthesized, retention-first gradient.

    Args:
        optimizer: an optimizer built over the model's parameters (any ``torch.optim.Optimizer``,
            including ones from other libraries). Its ``param_groups``, ``state`` and
            ``defaults`` are shared, not copied: LR schedulers, ``GradScaler`` and
            ``clip_grad_norm_`` acting on the wrapper act on it.
        rule: ``"sago"`` (default), ``"sago_prefer_retain"``, ``"pcgrad"``, ``"pcgrad_global"``,
            ``"sum"``, a registered name, a `gradsynth.rules.Rule`, or a per-tensor
            function ``fn(f, r, *, alpha, gamma) -> g``.
        alpha: weight of the retain gradient (>= 0).
        gamma: weight of the forget gradient (>= 0).
        track_geometry: after each synthesis, compute the gradient geometry
            (`geometry`). The built-in rules take its sums in the pass that writes the
            update (`gradsynth.rules.geometry_sums`): no extra gradient set; a custom rule's
            update goes to a new tensor per parameter, measured after.
        streaming: combine each parameter during the second task's backward, as soon as its
            gradient is complete, instead of holding both task gradients until `step`: peak
            memory falls from one extra gradient set to a fraction of one. Each step then takes
            any number of ``backward_*`` calls for one task followed by exactly one, with its
            loss, for the other. Refused under distributed training and for ``pcgrad_global``
            (see `gradsynth.optim.streaming`).

    A param group may carry its own ``"rule"``, ``"alpha"`` and ``"gamma"``. A key that the
    wrapped optimizer itself uses as a hyper-parameter (RMSprop's ``alpha``) belongs to it, and
    the wrapper's value applies to that group instead.

    Usage::

        opt = SynthesizingOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), rule="sago")
        opt.zero_grad()
        opt.backward_forget(forget_loss)
        opt.backward_retain(retain_loss)
        opt.step()
    """

    # GradScaler must unscale p.grad itself; never let it hand scale tensors to a fused base.
    _step_supports_amp_scaling = False

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rule: RuleLike = "sago",
        *,
        alpha: float = 1.0,
        gamma: float = 1.0,
        track_geometry: bool = False,
        streaming: bool = False,
    ) -> None:
        if isinstance(optimizer, SynthesizingOptimizer):
            raise ValueError(
                "this optimizer is a SynthesizingOptimizer already; wrap the base optimizer once "
                "(its .optimizer attribute) and set the rule there"
            )
        if not all(hasattr(optimizer, name) for name in ("param_groups", "step", "zero_grad", "state")):
            raise TypeError(
                f"SynthesizingOptimizer wraps an optimizer (a torch.optim.Optimizer or one with "
                f"param_groups, state, step and zero_grad); got {type(optimizer).__name__}. "
                "Build the optimizer first: SynthesizingOptimizer(torch.optim.AdamW(model.parameters()))"
            )
        self._base = optimizer
        self._rule = get_rule(rule)
        self._alpha = _check_weight("alpha", alpha)
        self._gamma = _check_weight("gamma", gamma)
        self.track_geometry = bool(track_geometry)
        self.streaming = bool(streaming)
        self._tasks = TaskGradients()
        self._synthesized = False
        self._external = False  # inside synthesized_elsewhere()
        self._geometry: GeometryAccumulator | None = None
        self._geometry_result: GradientGeometry | None = None
        # What torch.optim.Optimizer.__init__ sets up for step/state-dict hooks and profiling.
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._patch_step_function()
        for group in self._base.param_groups:
            self._check_group(group)
        if self.streaming:
            self._check_streamable()

    # ----- delegation to the wrapped optimizer ---------------------------------------------

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer."""
        return self._base

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._base.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self._base.state

    @state.setter
    def state(self, value: Any) -> None:
        self._base.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self._base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self._base.defaults = value

    def __getattr__(self, name: str) -> Any:
        # Only reached when normal lookup fails: e.g. schedule-free optimizers' train()/eval().
        if name.startswith("__") or name == "_base" or "_base" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self._base, name)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return (
            f"SynthesizingOptimizer(rule={_rule_name(self._rule)!r}, alpha={self._alpha}, "
            f"gamma={self._gamma}, optimizer={type(self._base).__name__})"
        )

    # ----- settings --------------------------------------------------------------------------

    @property
    def rule(self) -> Rule:
        """The default rule (a param group's ``"rule"`` overrides it)."""
        return self._rule

    @rule.setter
    def rule(self, value: RuleLike) -> None:
        self._rule = get_rule(value)

    @property
    def alpha(self) -> float:
        """Default weight of the retain gradient."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _check_weight("alpha", value)

    @property
    def gamma(self) -> float:
        """Default weight of the forget gradient."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = _check_weight("gamma", value)

    def _owns_key(self, group: dict[str, Any], key: str) -> bool:
        return key in group and key not in getattr(self._base, "defaults", {})

    def group_settings(self, group: dict[str, Any]) -> tuple[Rule, float, float]:
        """The ``(rule, alpha, gamma)`` that apply to one param group."""
        rule = get_rule(group["rule"]) if self._owns_key(group, "rule") else self._rule
        alpha = _check_weight("alpha", group["alpha"]) if self._owns_key(group, "alpha") else self._alpha
        gamma = _check_weight("gamma", group["gamma"]) if self._owns_key(group, "gamma") else self._gamma
        return rule, alpha, gamma

    def _check_group(self, group: dict[str, Any]) -> None:
        self.group_settings(group)
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(
                    "gradsynth does not handle complex parameters (SAGO compares signs, which "
                    "complex numbers lack); view them as real with torch.view_as_real"
                )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the wrapped optimizer; it may carry ``rule``/``alpha``/``gamma``."""
        self._check_group(param_group)
        self._base.add_param_group(param_group)

    def _params(self) -> Iterator[Tensor]:
        for group in self._base.param_groups:
            yield from group["params"]

    # ----- collecting the two task gradients ------------------------------------------------

    def backward_forget(self, loss: Tensor | None = None, **backward_kwargs: Any) -> None:
        """Attribute to the forget task what backward accumulates since the last ``backward_*`` call.

        With ``loss``, runs ``loss.backward(**backward_kwargs)`` first. With ``None``, the
        backward was done elsewhere (``accelerator.backward``, ``scaler.scale(loss).backward()``):
        call this right after it.
        """
        self._backward(FORGET, loss, backward_kwargs)

    def backward_retain(self, loss: Tensor | None = None, **backward_kwargs: Any) -> None:
        """Attribute to the retain task what backward accumulates since the last ``backward_*`` call.

        Same contract as `backward_forget`.
        """
        self._backward(RETAIN, loss, backward_kwargs)

    def _backward(self, task: str, loss: Tensor | None, backward_kwargs: dict[str, Any]) -> None:
        if self._synthesized:
            streaming = (
                " With streaming=True the second task's backward synthesizes: a step takes any number of "
                "backward_* calls for one task, then exactly one for the other."
                if self.streaming
                else ""
            )
            raise RuntimeError(
                f"backward_{task}() after synthesize() and before step()/zero_grad(): p.grad holds the "
                "synthesized update, which would be mixed into the task gradient. Call all "
                "backward_* of a step first, then synthesize()/step(); call zero_grad() before the next "
                f"step.{streaming}"
            )
        if loss is not None:
            if not isinstance(loss, Tensor):
                raise TypeError(f"backward_{task} expects a loss tensor or None, got {type(loss).__name__}")
            if self.streaming and self._tasks.holds(other_task(task)):
                self._stream_backward(task, loss, backward_kwargs)
                return
            with torch.no_grad():
                self._tasks.before_backward(task, self._params())
            try:
                loss.backward(**backward_kwargs)
            finally:
                # Even when backward fails, the task's stash must leave p.grad again.
                with torch.no_grad():
                    self._tasks.absorb(task, self._params())
            return
        if backward_kwargs:
            raise TypeError(f"backward_{task}(None) runs no backward, so it takes no backward arguments")
        if self.streaming and self._tasks.holds(other_task(task)):
            raise ValueError(
                f"streaming=True needs the loss of the second task of a step: call backward_{task}(loss) "
                "so the wrapper runs that backward with its hooks in place (with None the backward has "
                "already run). For an external backward (accelerator.backward), use streaming=False."
            )
        with torch.no_grad():
            self._tasks.absorb(task, self._params())

    def _check_streamable(self) -> None:
        rules = {id(rule): rule for rule, _, _ in map(self.group_settings, self._base.param_groups)}
        check_streamable(rules.values(), self._params())

    def _stream_backward(self, task: str, loss: Tensor, backward_kwargs: dict[str, Any]) -> None:
        self._check_streamable()
        settings = {
            p: self.group_settings(group) for group in self._base.param_groups for p in group["params"]
        }
        geometry = GeometryAccumulator() if self.track_geometry else None
        stream = StreamingBackward(self._tasks, task, settings, geometry)
        try:
            with stream:
                loss.backward(**backward_kwargs)
        except BaseException:
            # Some parameters were combined, others not: no step can be taken from this state.
            self._tasks.clear()
            for p in self._params():
                p.grad = None
            raise
        with torch.no_grad():
            self._tasks.settle(stream.done)
            self._tasks.absorb(task, self._params())
        self._synthesize(geometry)

    # ----- synthesis --------------------------------------------------------------------------

    @property
    def pending(self) -> bool:
        """True when task gradients wait to be synthesized."""
        return self._tasks.pending

    @torch.no_grad()
    def synthesize(self) -> None:
        """Write the synthesized gradient into ``p.grad`` of every managed parameter.

        Idempotent: with nothing pending it does nothing. Call it before ``clip_grad_norm_`` or
        ``scaler.unscale_(opt)`` so they act on the synthesized gradient; ``step()`` calls it
        otherwise. A parameter neither task reached keeps its ``p.grad``; one that a single task
        reached gets a zero gradient for the other.
        """
        if not self._tasks.pending:
            return
        self._synthesize(GeometryAccumulator() if self.track_geometry else None)

    @torch.no_grad()
    def _synthesize(self, geometry: GeometryAccumulator | None) -> None:
        self._refuse_unattributed()
        groups = [(self.group_settings(group), group["params"]) for group in self._base.param_groups]
        # The task gradients stay in their stashes (peeked, not taken) until every update is
        # computed, so that a rule that raises leaves them pending as they were (see `_combine`).
        done = self._combine(groups, geometry)
        for p, update in zip(done.params, done.updates, strict=True):
            self._tasks.take(p)
            self._tasks.place(p, update)
        self._geometry = done.geometry
        self._geometry_result = None
        self._synthesized = True

    def _combine(self, groups: list[Group], geometry: GeometryAccumulator | None) -> Synthesis:
        """Every parameter's update (`synthesize`); the pending task gradients are left in place.

        If a rule raises, the pending gradients are as they were when nothing was written over
        them yet: the rule failed in ``prepare``, on the first parameter, or it is a custom rule
        with geometry tracked (its updates then go to new tensors). Otherwise (an in-place update
        already replaced some retain gradients) they are dropped and a ``RuntimeError`` says to
        redo the step.
        """
        written: list[int] = []
        try:
            return synthesize(groups, self._tasks.peek, geometry, written=written)
        except Exception as err:
            if not written:
                raise
            self.zero_grad()
            raise RuntimeError(
                f"the synthesis failed ({type(err).__name__}: {err}) after some retain gradients were "
                "replaced in place by their update; this step's task gradients were dropped: fix the "
                "rule and redo the step's backward passes"
            ) from err

    @contextlib.contextmanager
    def synthesized_elsewhere(self, geometry: GeometryAccumulator | None = None) -> Iterator[None]:
        """Within the block, ``step()`` passes straight to the wrapped optimizer, any number of times.

        For engine integrations that read the task gradients out of an engine, synthesize them
        with `gradsynth.optim.combine.synthesize` under this wrapper's `group_settings` and write
        the update back into the engine, whose own optimizer then calls this wrapper's ``step``
        on its flat partitions (DeepSpeed's ZeRO does, once per param group). `geometry` reports
        ``geometry`` (already reduced) from then on.
        """
        if self._tasks.pending:
            raise RuntimeError(
                "task gradients are pending in this optimizer and an engine integration synthesized the "
                "step elsewhere: use either backward_forget/backward_retain on the optimizer or the "
                "engine integration's, not both"
            )
        self._geometry = geometry
        self._geometry_result = None
        self._external = True
        try:
            yield
        finally:
            self._external = False
            self._synthesized = False

    def _refuse_unattributed(self) -> None:
        param = self._tasks.unattributed(self._params())
        if param is not None:
            raise RuntimeError(
                f"a gradient reached a parameter of shape {tuple(param.shape)} after the last "
                "backward_forget()/backward_retain() call, so it belongs to no task; call "
                "backward_forget(None) or backward_retain(None) right after that backward"
            )

    @property
    def pending_geometry(self) -> GeometryAccumulator | None:
        """The sums behind `geometry` of the last synthesis, not read yet (``.result()`` reads them).

        For a logger that reads every few steps: keeping it costs no host sync now.
        """
        return self._geometry

    @property
    def geometry(self) -> GradientGeometry | None:
        """Gradient geometry of the last synthesis (``track_geometry=True``), else ``None``.

        Reading it costs one host sync per device.
        """
        if self._geometry is not None and self._geometry_result is None:
            self._geometry_result = self._geometry.result()
        return self._geometry_result

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Synthesize pending task gradients, then step the wrapped optimizer.

        A ``closure`` must zero the gradients, call ``backward_forget``/``backward_retain`` and
        return the loss; it is followed by a synthesis each time the wrapped optimizer calls it.
        """
        if self.__dict__.get("_external", False):
            return self._base.step() if closure is None else self._base.step(closure)
        if closure is None:
            if not self._synthesized and not self._tasks.pending:
                self._refuse_unattributed()  # e.g. loss.backward(); opt.step() with no task named
            self.synthesize()
            result = self._base.step()
        else:

            def synthesized_closure() -> Any:
                loss = closure()
                self.synthesize()
                return loss

            self.synthesize()
            result = self._base.step(synthesized_closure)
        self._synthesized = False
        return result

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop pending task gradients and zero ``p.grad`` through the wrapped optimizer."""
        self._tasks.clear()
        self._synthesized = False
        self._base.zero_grad(set_to_none=set_to_none)
        self._tasks.mark_empty(self._params())

    # ----- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state dict plus a ``"gradsynth"`` entry with the wrapper's settings.

        Refused while task gradients are pending: a checkpoint holds optimizer state, not
        half-collected gradients. Take it after ``step()`` or ``zero_grad()``.
        """
        if self._tasks.pending:
            raise RuntimeError(
                "state_dict() called with task gradients pending (after backward_forget/backward_retain, "
                "before step()); save the checkpoint after step() or zero_grad()"
            )
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._base.state_dict()
        state["gradsynth"] = {
            "version": STATE_VERSION,
            "rule": _rule_name(self._rule),
            "alpha": self._alpha,
            "gamma": self._gamma,
            "track_geometry": self.track_geometry,
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            state = post_hook(self, state) or state
        return state

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Refuse, before anything changes, a load that would fail later or corrupt a step.

        After ``synthesize()``, ``p.grad`` holds the update: a load that reset the bookkeeping
        would let the next backward take it for a task gradient. Per-group ``rule``/``alpha``/
        ``gamma`` of the checkpoint are checked as `add_param_group` checks them.
        """
        if self._synthesized:
            raise RuntimeError(
                "load_state_dict() after synthesize() and before step()/zero_grad(): p.grad holds the "
                "synthesized update, which the next backward would mix into a task gradient. Load the "
                "checkpoint before the step's backward passes, or call zero_grad() first."
            )
        for index, group in enumerate(state_dict.get("param_groups", [])):
            try:
                if "rule" in group and "rule" not in getattr(self._base, "defaults", {}):
                    get_rule(group["rule"])
                for key in ("alpha", "gamma"):
                    if key in group and key not in getattr(self._base, "defaults", {}):
                        _check_weight(key, group[key])
            except (TypeError, ValueError, KeyError) as err:
                raise type(err)(f"param group {index} of the checkpoint: {err}") from err

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from `state_dict` (or a plain one of the wrapped optimizer).

        The wrapper's settings are restored by rule name: a custom rule must be registered
        (``gradsynth.register_rule``) under the saved name before loading. Like ``lr`` in a
        plain optimizer's state dict, the checkpoint's settings replace the optimizer's; one that
        was set away from its default and differs is replaced with a ``UserWarning`` naming both.
        """
        self._check_loadable(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        state_dict = dict(state_dict)
        settings = state_dict.pop("gradsynth", None)
        if settings is not None:
            version = settings.get("version")
            if version != STATE_VERSION:
                raise ValueError(
                    f"this checkpoint's gradsynth entry has version {version!r}; this gradsynth reads "
                    f"version {STATE_VERSION}"
                )
            rule = self._rule if settings["rule"] == _rule_name(self._rule) else get_rule(settings["rule"])
            alpha = _check_weight("alpha", settings["alpha"])
            gamma = _check_weight("gamma", settings["gamma"])
        self._base.load_state_dict(state_dict)
        if settings is not None:
            _warn_on_changed_settings(self, settings)
            self._rule, self._alpha, self._gamma = rule, alpha, gamma
            self.track_geometry = bool(settings.get("track_geometry", False))
        self._tasks.clear()
        self._synthesized = False
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
