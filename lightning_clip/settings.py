"""The callback's flat arguments: checked, built into a rule, a remedy and an engine, and live after construction.

Each option is declared once, by the unit that reads it: a rule or remedy names the flat ``GradientClipping``
arguments it reads in ``options`` and gives their types and defaults in its ``__init__`` signature; the engine's
own settings are the keywords of :meth:`ClipEngine.configure <lightning_clip.engine.ClipEngine.configure>`. From
these this module derives the callback's defaults (:func:`declared_default`), which setting a policy would ignore
(refused when changed), which numbers become plain Python ones, and which unit an assignment after construction
retunes (:class:`Settings`). Only the arguments fixed at construction are listed here (:data:`FIXED`), with why.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Any

from lightning_clip import metrics as M
from lightning_clip.detect import SpikeDetector
from lightning_clip.engine import ClipEngine
from lightning_clip.health import VanishingMonitor
from lightning_clip.remedies import REMEDIES, Remedy, build_remedy
from lightning_clip.rules import RULES, ClipRule, build_rule
from lightning_clip.validation import check_count

# They decide the checkpoint key, the tags or which units run: fixed once built (the reason goes in the error).
FIXED = {
    "mode": "it picks the clip rule and the checkpoint key",
    "nan_policy": "it picks the remedy",
    "name": "it is part of the checkpoint key and of every tag",
    "rule": "it is the clip rule itself",
    "skip_spikes": "it decides whether spike statistics are kept",
    "loss_spikes": "it decides whether loss statistics are kept",
    "vanishing_ratio": "it decides whether weight norms are measured",
    "vanishing_patience": "it is part of the vanishing monitor's state",
    "spike_window": "it sizes the spike history",
}
# Checked whatever the mode or policy (by the unit that reads them): they carry a default, so are always given.
CHECKED_ALWAYS = ("max_norm", "lr_factor", "max_consecutive_nonfinite")
_FROM_RULE = ("mode", "min_value", "max_value")  # read as the rule holds them (clip_value sets both bounds)


def _default(unit: Callable[..., Any], name: str) -> Any:
    parameter = inspect.signature(unit).parameters.get(name)
    return None if parameter is None or parameter.default is parameter.empty else parameter.default


def _readers(units: Iterable[type]) -> dict[str, list[type]]:
    """Each option of the registered ``units`` with the units that read it, in registry order."""
    readers: dict[str, list[type]] = {}
    for unit in units:
        for option in getattr(unit, "options", ()):
            readers.setdefault(option, []).append(unit)
    return readers


def engine_settings() -> tuple[str, ...]:
    """The engine's own settings: live through :meth:`ClipEngine.configure`."""
    return tuple(inspect.signature(ClipEngine.configure).parameters)[1:]


def declared_default(name: str) -> Any:
    """The default of an option where it is declared: the engine's signature for its own settings, else the first
    registered rule or remedy that reads it (among the remedies: ``skip``'s, where they disagree)."""
    if name in engine_settings():
        return _default(ClipEngine, name)
    readers = {**_readers(RULES.values()), **_readers(REMEDIES.values())}
    return _default(readers[name][0], name)


def _agreed(readers: list[type], name: str) -> bool:
    """All readers give the option the same default: changing it under a unit that does not read it is refused."""
    return len({repr(_default(unit, name)) for unit in readers}) == 1


def number_types(*functions: Callable[..., Any]) -> dict[str, type]:
    """``float`` or ``int`` for each argument annotated with it (alone or ``| None``); the first function that
    annotates a name decides."""
    types: dict[str, type] = {}
    for function in reversed(functions):
        try:
            hints = typing.get_type_hints(function)
        except (NameError, TypeError):  # a unit's annotation that does not resolve here: not a number we convert
            continue
        for name, hint in hints.items():
            kinds = set(typing.get_args(hint)) or {hint}
            kind = next((kind for kind in (float, int) if kind in kinds), None)
            if kind is not None:
                types[name] = kind
    return types


class _Options:
    """The options of one kind of unit (rules or remedies) as the flat arguments give them."""

    def __init__(self, units: Iterable[type], values: dict[str, Any]) -> None:
        self.readers = _readers(units)
        names = [k for k in values if k in self.readers] + [k for k in self.readers if k not in values]
        self.defaults = {k: _default(self.readers[k][0], k) for k in names}
        self.given = {k: values.get(k, self.defaults[k]) for k in names}
        for k in CHECKED_ALWAYS:
            if k in self.given:
                self.readers[k][0](**{k: self.given[k]})  # its reader checks it, with its message

    def changed(self) -> dict[str, Any]:
        return {k: v for k, v in self.given.items() if v != self.defaults[k]}


def build_rule_from(values: dict[str, Any]) -> ClipRule:
    """The rule named by ``mode`` from the flat arguments; a bound that the mode would ignore is refused."""
    options = _Options(RULES.values(), values)
    unset = {k: v for k, v in options.given.items() if options.defaults[k] is None}
    rule = build_rule(values["mode"], strict=unset, **{k: v for k, v in options.given.items() if k not in unset})
    for k, v in options.changed().items():
        if k not in unset and k not in rule.options:  # it carries a default: only a changed value shows it was set
            raise ValueError(f"`{k}` does not apply to mode={values['mode']!r}; got {k}={v!r}.")
    return rule


def check_rule_object(rule: ClipRule, values: dict[str, Any]) -> ClipRule:
    """A rule object replaces ``mode`` and the bounds (the options without a default)."""
    options = _Options(RULES.values(), values)
    bounds = {k: v for k, v in options.given.items() if options.defaults[k] is None}
    mode = values["mode"]
    if mode not in ("norm", getattr(rule, "mode", None)) or any(v is not None for v in bounds.values()):
        raise ValueError(f"`rule` ({rule!r}) replaces `mode` and its bounds; got mode={mode!r} with {bounds}.")
    return rule


def build_remedy_from(values: dict[str, Any]) -> Remedy:
    """The remedy named by ``nan_policy`` (or given as one); a setting the policy would ignore is refused."""
    options = _Options(REMEDIES.values(), values)
    policy = values["nan_policy"]
    if isinstance(policy, Remedy):
        changed = options.changed()
        if changed:
            raise ValueError(
                f"`nan_policy` ({policy!r}) is a remedy object, which carries its own settings; got {changed} as well: "
                "pass them to the remedy instead."
            )
        return policy
    agreed = [k for k in options.given if _agreed(options.readers[k], k)]
    strict = {k: options.given[k] for k in sorted(agreed, key=lambda k: options.defaults[k] is not None)}
    strict = {k: v for k, v in strict.items() if v != options.defaults[k]}
    return build_remedy(policy, strict=strict, **{k: v for k, v in options.given.items() if k not in strict})


def build_engine(values: dict[str, Any]) -> ClipEngine:
    """The engine of a ``GradientClipping`` built from its arguments (``values``), each checked."""
    check_count("spike_window", values["spike_window"], allow_none=False)  # checked also while skip_spikes is off
    M.check_instance_name(values["name"])
    rule = build_rule_from(values) if values["rule"] is None else check_rule_object(values["rule"], values)
    window, skip_k, loss_k = values["spike_window"], values["skip_spikes"], values["loss_spikes"]
    warmup = min(20, window)
    spikes = None if skip_k is None else SpikeDetector(skip_k, window, warmup)
    losses = None if loss_k is None else SpikeDetector(loss_k, window, warmup, "loss_spikes")
    check_count("vanishing_patience", values["vanishing_patience"], allow_none=False)
    ratio = values["vanishing_ratio"]
    vanishing = None if ratio is None else VanishingMonitor(ratio, values["vanishing_patience"])
    return ClipEngine(
        rule,
        build_remedy_from(values),
        spike_skip=spikes,
        name=values["name"],
        loss_spike=losses,
        vanishing=vanishing,
        **{k: values[k] for k in engine_settings()},
    )


class Settings:
    """A ``GradientClipping``'s arguments in force, by name: :meth:`get` reads one, :meth:`assign` checks a new
    value as the constructor would and hands it to the unit that reads it (from the next step on), or refuses it.

    ``values``: the constructor's arguments; ``declared``: functions whose annotations say which are numbers
    (numpy scalars among them become Python floats and ints once checked).
    """

    def __init__(self, values: dict[str, Any], *declared: Callable[..., Any]) -> None:
        self.values = values
        units = [*RULES.values(), *REMEDIES.values(), type(values["nan_policy"]), type(values["rule"])]
        self.numbers = number_types(*declared, *(unit.__init__ for unit in units if hasattr(unit, "options")))
        self.engine = build_engine(values)
        values.update({k: self._plain(k, v) for k, v in values.items()})  # checked by now

    def _plain(self, name: str, value: Any) -> Any:
        kind = self.numbers.get(name)
        return value if kind is None or value is None else kind(value)

    def knows(self, name: str) -> bool:
        """A setting: a constructor argument, or an option of a registered rule or remedy."""
        return name in self.values or name in _readers([*RULES.values(), *REMEDIES.values()])

    def get(self, name: str) -> Any:
        if name in _FROM_RULE:
            return getattr(self.engine.rule, name, None)
        return self.values[name] if name in self.values else declared_default(name)

    def assign(self, name: str, value: Any) -> None:
        if name in FIXED:
            raise AttributeError(
                f"`{name}` cannot be changed after GradientClipping is built ({FIXED[name]}); build a new "
                f"GradientClipping({name}={value!r}, ...) instead."
            )
        values = {**self.values, name: value}
        if name in engine_settings():
            self.engine.configure(**{name: value})
        elif name in _readers(REMEDIES.values()):
            if isinstance(self.values["nan_policy"], Remedy):
                raise ValueError(
                    f"`{name}` does not apply: this GradientClipping was built with nan_policy="
                    f"{self.values['nan_policy']!r}; build a new GradientClipping with the remedy you want."
                )
            self.engine.retune(remedy=build_remedy_from(values))
        elif self.values["rule"] is not None:
            raise ValueError(
                f"`{name}` does not apply: this GradientClipping was built with rule={self.values['rule']!r}; "
                "build a new GradientClipping with the rule you want."
            )
        else:
            self.engine.retune(rule=build_rule_from(values))
        self.values[name] = self._plain(name, value)


__all__ = ["FIXED", "Settings", "build_engine", "build_remedy_from", "build_rule_from", "declared_default"]
