"""``GradientClippingCLI``: a ``LightningCLI`` that reports a bad ``GradientClipping`` setting in one line.

A plain ``LightningCLI`` reports a mistake in a callback's ``init_args`` badly:

* jsonargparse refuses a wrong type or a misspelled key while parsing, and prints the whole usage block
  (~75 lines) with the useful line buried in a nested "Union subtypes" report;
* ranges, choices and combinations (``max_norm: -1``, ``mode: l2``, ``min_value > max_value``) are checked
  in ``__init__``, which ``LightningCLI`` runs while instantiating: two tracebacks around the message.

:class:`GradientClippingCLI` prints one ``error:`` line naming the configuration key instead and exits
with status 2, as jsonargparse does for its own errors. jsonargparse does the checking; this module only
finds the callback's index in ``trainer.callbacks``, words jsonargparse's refusal as one line and adds a
did-you-mean to a misspelled key. Errors about anything else keep jsonargparse's usual report. The logic
lives in :class:`GradientClippingCLIMixin`, shared with ``lightning_clip.lightning_pytorch.GradientClippingCLI``
(the ``lightning.pytorch`` namespace).

Example (``train.py``)::

    from lightning_clip import GradientClippingCLI

    GradientClippingCLI(MyModel, MyDataModule)

    # python train.py fit --config config.yaml, with these init_args in config.yaml, prints one line:
    # max_norm: -1
    #   error: trainer.callbacks[0].init_args.max_norm: "max_norm" must be a finite positive number, got -1.0.
    # max_norm: abc
    #   error: trainer.callbacks[0].init_args.max_norm: "max_norm" must be a number, got 'abc'.
    # max_nrom: 1.0
    #   error: trainer.callbacks[0].init_args.max_nrom: unknown argument "max_nrom" of GradientClipping; did you
    #   mean "max_norm"?
    # nan_policy: {class_path: lightning_clip.remedies.Rollback, init_args: {snapshot_every: 0}}
    #   error: trainer.callbacks[0].init_args.nan_policy.init_args.snapshot_every: "snapshot_every" must be a
    #   positive integer, got 0.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import sys
from argparse import ArgumentError
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from traceback import walk_tb
from typing import Any, NoReturn

try:
    from jsonargparse import ArgumentParser, Namespace, get_loader
except ImportError as err:  # LightningCLI itself needs jsonargparse: say how to get it
    raise ImportError(
        f"GradientClippingCLI needs jsonargparse, as LightningCLI does, and it could not be imported ({err}): "
        "pip install 'lightning-clip[cli]' (or 'jsonargparse[signatures]')"
    ) from err
from pytorch_lightning.cli import LightningCLI

from lightning_clip.callback import GradientClipping

__all__ = ["GradientClippingCLI", "GradientClippingCLIMixin", "fail", "named_key"]

# Where LightningCLI puts the Trainer's callbacks, in a config and on the command line.
_CALLBACKS = "trainer.callbacks"
# jsonargparse's report of a refused init_args key: the class, then the unknown option or the key and, indented
# below it, why the value was refused.
_PROBLEM = re.compile(
    r"Problem with given class_path '([\w.]+)':\n( +)(?:Option '(\w+)' is not accepted|"
    r'Parser key "(\w+)":\n((?:\2 .*(?:\n|$))*))'
)
_EXPECTED = re.compile(r"Expected a <class '(?:\w+\.)*(\w+)'>(?:\. Got value: .*)?")
_WORDS = {"NoneType": "null", "bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


def fail(message: str) -> NoReturn:
    """A configuration mistake: one ``error:`` line on stderr, exit status 2 (jsonargparse's status for bad input).

    Argument names that validation messages put in backquotes (`max_norm`, docstring style) are shown in
    double quotes, as jsonargparse names keys: every one-line error of the CLI reads the same way, whichever
    check (the parser or ``__init__``) found the mistake.

    Example::

        fail("trainer.callbacks[0].init_args.max_norm: `max_norm` must be a finite positive number, got -1.0.")
        # stderr: error: trainer.callbacks[0].init_args.max_norm: "max_norm" must be a finite positive number, ...
        # exit status 2
    """
    sys.stderr.write(f"error: {_cli_quotes(message)}\n")
    raise SystemExit(2)


def _cli_quotes(message: str) -> str:
    """`name` -> "name"."""
    return re.sub(r"`([^`\s]+)`", r'"\1"', message)


def named_key(message: str) -> str:
    """``.arg`` for the first `backquoted` argument name in a validation message ('' if none).

    Example::

        named_key("`max_norm` must be a finite positive number, got -1.0.")  # ".max_norm"
    """
    found = re.search(r"`([\w\[\]]+)`", message)
    return f".{found.group(1)}" if found else ""


def _class(class_path: Any, base: type = object) -> Any:
    """The class at ``class_path`` if it is a subclass of ``base``, else None."""
    module, _, name = str(class_path).rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, base) else None


def _explain(report: str, base: type = object) -> tuple[str, str] | None:
    """``(key, message)`` for the first refused ``init_args`` key of a ``base`` class in a jsonargparse report."""
    for found in _PROBLEM.finditer(report):
        cls = _class(found[1], base)
        if cls is None:
            continue
        option, key, why = found[3], found[4], found[5]
        if option:  # unknown key: jsonargparse lists nothing, say what is close
            params = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
            close = difflib.get_close_matches(option, params, n=1)
            hint = f'did you mean "{close[0]}"?' if close else f"the arguments are: {', '.join(params)}."
            return option, f'unknown argument "{option}" of {cls.__name__}; {hint}'
        nested = _explain(why)  # a class-typed argument (``rule: {class_path: ...}``) refused one of its own
        if nested is not None:
            return f"{key}.init_args.{nested[0]}", nested[1]
        reasons = re.findall(r"^ *- (.*)", why, re.M) or why.strip().splitlines()[:1]
        got = re.search(r"(?:Got|Given) value: (.*)", why)
        types = [_EXPECTED.fullmatch(r) for r in reasons]
        if got is None or not all(types):  # a check other than a plain type: jsonargparse's own words
            return key, f'"{key}": ' + "; ".join(reasons)
        try:
            value = ast.literal_eval(got[1])
        except (ValueError, SyntaxError):
            value = got[1]  # not a Python literal: a string as given (abc, inf)
        words = sorted(dict.fromkeys(_WORDS.get(t[1], t[1]) for t in types if t), key="null".__eq__)
        spelling = " (infinity is .inf in YAML)" if str(value).lower().lstrip("+-") in ("inf", "infinity") else ""
        return key, f'"{key}" must be {" or ".join(words)}, got {value!r}{spelling}.'
    return None


def _innermost(err: BaseException) -> BaseException:
    """The error at the root of ``err``'s ``__cause__`` chain (jsonargparse wraps a nested class's error)."""
    return err if err.__cause__ is None else _innermost(err.__cause__)


def _build_problem(entry: Namespace, cls: type) -> tuple[str, BaseException] | None:
    """``(key path below init_args, error)`` of building ``entry`` (a ``class_path`` of ``cls``); None if it builds.

    jsonargparse builds it as it will for LightningCLI, class-typed arguments (``rule``, ``nan_policy``) first.
    One of those that fails its own ``__init__`` is built again alone, so that its own error is the one reported:
    inside a union (``nan_policy: str | Remedy``) jsonargparse chains only the first subtype's refusal ("Expected
    a <class 'str'>"), not the class's.
    """
    builder = ArgumentParser()
    builder.add_argument("--entry", type=cls)
    try:
        builder.instantiate_classes(Namespace(entry=entry.clone()))
    except (ValueError, TypeError) as err:
        if any(isinstance(frame.f_locals.get("self"), cls) for frame, _ in walk_tb(err.__traceback__)):
            return named_key(str(err)), err
        for key, value in vars(entry.get("init_args") or Namespace()).items():
            inner = _class(getattr(value, "class_path", None)) if isinstance(value, Namespace) else None
            problem = None if inner is None else _build_problem(value, inner)
            if problem is not None:
                return f".{key}.init_args{problem[0]}", problem[1]
        cause = _innermost(err)  # not found alone: the deepest error jsonargparse chained
        return named_key(str(cause)), cause
    return None


class _Refused(Exception):
    """jsonargparse refused a GradientClipping entry: the one-line report (not a TypeError: nothing catches it)."""


def _reporting(check: Callable[..., Any], dest: str) -> Callable[..., Any]:
    """The ``trainer.callbacks`` type check ``check``, raising :class:`_Refused` for a refused GradientClipping."""

    def checked(value: Any, **kwargs: Any) -> Any:
        try:
            return check(value, **kwargs)
        except TypeError as err:
            cfg, report = kwargs.get("cfg"), str(err)
            before = cfg.get(dest) if isinstance(cfg, Namespace) else None
            count = len(before) if isinstance(before, list) else int(isinstance(before, (dict, Namespace)))
            # ``--trainer.callbacks+=X`` adds an entry; ``--trainer.callbacks.KEY=V`` (a NestedArg) sets the last one
            nested_arg = getattr(value, "_fields", None) == ("key", "val")
            index = count if kwargs.get("append") else max(count - 1, 0) if nested_arg else 0
            if isinstance(value, str):  # inline YAML or a file, as jsonargparse reads it (unreadable: left as is)
                with suppress(Exception):
                    value = get_loader(kwargs.get("mode") or "yaml")(
                        Path(value).read_text() if Path(value).is_file() else value
                    )
            for i, entry in enumerate(value if isinstance(value, list) else []):
                try:  # the first entry refused on its own is the one at fault
                    check(entry)
                except TypeError as entry_err:
                    index, report = index + i, str(entry_err)
                    break
            problem = _explain(report, GradientClipping)
            if problem is None:
                raise
            raise _Refused(f"{_CALLBACKS}[{index}].init_args.{problem[0]}: {problem[1]}") from err

    return checked


# A mixin: the namespace's LightningCLI comes after it in the MRO. Typed ``Any`` so that mypy accepts its
# ``super()`` calls and either namespace's LightningCLI next to it (they are unrelated classes to mypy).
_MixinBase: Any = object


class GradientClippingCLIMixin(_MixinBase):
    """The one-line errors of :class:`GradientClippingCLI`, for a ``LightningCLI`` of either namespace.

    List it before the ``LightningCLI`` base. It overrides two public hooks of ``LightningCLI``:
    ``add_core_arguments_to_parser`` (to watch jsonargparse's check of ``trainer.callbacks``) and
    ``parse_arguments`` (where both kinds of mistakes are reported, before ``LightningCLI`` seeds or
    instantiates anything).

    Example::

        from lightning.pytorch.cli import LightningCLI

        class MyCLI(GradientClippingCLIMixin, LightningCLI):
            pass
    """

    def add_core_arguments_to_parser(self, parser: Any) -> None:
        """``LightningCLI.add_core_arguments_to_parser``, then report jsonargparse's refusals of a GradientClipping."""
        super().add_core_arguments_to_parser(parser)
        action = parser._option_string_actions.get(f"--{_CALLBACKS}")
        if hasattr(action, "_check_type_"):
            action._check_type_ = _reporting(action._check_type_, action.dest)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as ``LightningCLI`` does, then report a bad GradientClipping entry in one line.

        Two kinds of mistakes: those jsonargparse refuses while parsing (unknown key, wrong type), and those
        only ``__init__`` knows (ranges, choices, combinations), found by building each configured
        GradientClipping once. Both before ``LightningCLI`` seeds or instantiates anything, so the error line
        is all the user sees.
        """
        try:
            super().parse_arguments(parser, args)
        except _Refused as refused:
            self._report(parser, str(refused), refused)
        problem = self._constructor_problem()
        if problem is not None:
            self._report(parser, problem, None)

    @staticmethod
    def _report(parser: Any, problem: str, cause: BaseException | None) -> NoReturn:
        """One ``error:`` line and exit 2; an ``ArgumentError`` instead if the parser should not exit."""
        if not getattr(parser, "exit_on_error", True):
            raise ArgumentError(None, _cli_quotes(problem)) from cause
        fail(problem)

    def _constructor_problem(self) -> str | None:
        """Build each configured GradientClipping once: ``key path: message`` of the first ``__init__`` error."""
        subcommand = self.config.get("subcommand")
        callbacks = (self.config[subcommand] if subcommand else self.config).get(_CALLBACKS) or []
        for i, entry in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            cls = _class(getattr(entry, "class_path", None), GradientClipping)
            problem = None if cls is None else _build_problem(entry, cls)
            if problem is not None:
                return f"{_CALLBACKS}[{i}].init_args{problem[0]}: {problem[1]}"
        return None


class GradientClippingCLI(GradientClippingCLIMixin, LightningCLI):
    """``pytorch_lightning.cli.LightningCLI`` that reports a bad ``GradientClipping`` setting in one line.

    A refused ``init_args`` key of a ``GradientClipping`` under ``trainer.callbacks`` (unknown key, wrong
    type, value out of range) ends the run before anything is instantiated, with exit status 2 and one
    line on stderr that names the key. Use it exactly like ``LightningCLI``; for ``lightning.pytorch``
    use ``lightning_clip.lightning_pytorch.GradientClippingCLI``.

    Example::

        from lightning_clip import GradientClippingCLI

        GradientClippingCLI(MyModel, MyDataModule)
        # mode: l2 in the config -> one line, exit status 2:
        # error: trainer.callbacks[0].init_args.mode: "mode" must be one of 'norm', 'value', 'none', ..., got 'l2'.
    """
