"""``GradientClippingCLI``: a ``LightningCLI`` that reports a bad ``GradientClipping`` setting in one line.

A plain ``LightningCLI`` reports a mistake in a callback's ``init_args`` badly:

* jsonargparse refuses a wrong type, an unknown ``mode`` or a misspelled key while parsing, and prints
  the whole usage block (~75 lines) with the useful line buried in a nested "Union subtypes" report;
* ranges and combinations (``max_norm: -1``, ``min_value > max_value``) are checked in ``__init__``,
  which ``LightningCLI`` runs while instantiating: two tracebacks around the message.

:class:`GradientClippingCLI` prints one ``error:`` line naming the configuration key instead and exits
with status 2, as jsonargparse does for its own errors. Errors about anything else keep jsonargparse's
usual report. The logic lives in :class:`GradientClippingCLIMixin`, shared with
``lightning_clip.lightning_pytorch.GradientClippingCLI`` (the ``lightning.pytorch`` namespace).

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
"""

from __future__ import annotations

import difflib
import glob
import importlib
import inspect
import os
import re
import sys
import types
import typing
from argparse import ArgumentError
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NoReturn, Union

from jsonargparse import ArgumentParser, Namespace, get_loader
from pytorch_lightning.cli import LightningCLI

from lightning_clip.callback import GradientClipping

__all__ = ["GradientClippingCLI", "GradientClippingCLIMixin", "fail", "named_key"]

# Where LightningCLI puts the Trainer's callbacks, in a config and on the command line.
_CALLBACKS = "trainer.callbacks"


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


def _clip_class(class_path: Any) -> type[GradientClipping] | None:
    """The class at ``class_path`` if it is GradientClipping or a subclass, else None."""
    if not isinstance(class_path, str) or "." not in class_path:
        return None
    module, _, name = class_path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None  # jsonargparse reports unknown class paths itself
    return obj if isinstance(obj, type) and issubclass(obj, GradientClipping) else None


# ---------------------------------------------------------------------------------------------------------
# Checking raw init_args (as written in YAML / on the command line) against the class's signature.
#
# These run only after jsonargparse has refused the configuration, to say *which* key it refused. They
# follow jsonargparse's rules for the plain types they model and accept any value of other types, so an
# error they do not recognise keeps jsonargparse's own report rather than a wrong one-liner.


def _fits(value: Any, hint: Any, load: Callable[[str], Any]) -> bool:
    """Whether jsonargparse accepts ``value`` (as loaded from YAML or the command line) for the type ``hint``.

    Like jsonargparse, a string given for another type is read again as YAML (``"1.5"`` is a number, ``inf``
    is not: YAML spells it ``.inf``), and nothing else is converted (``5`` is not a string, ``2.0`` not an int).
    """
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return any(_fits(value, h, load) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if isinstance(value, str) and hint is not str:
        value = load(value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # a type these checks do not model: jsonargparse has the last word


def _describe(hint: Any) -> str:
    """What ``hint`` expects, in words: ``a number or null``, ``one of 'norm', 'value', 'none'``."""
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        # null last: "a number or null" reads better than "null or a number".
        args = sorted(typing.get_args(hint), key=lambda h: h is type(None))
        return " or ".join(dict.fromkeys(_describe(h) for h in args))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _parse_problem(cls: type[GradientClipping], init_args: Any, load: Callable[[str], Any]) -> tuple[str, str] | None:
    """``(argument, message)`` for the first unknown key or wrongly typed value in raw ``init_args``."""
    if not isinstance(init_args, dict):
        return None
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}
    takes_any_key = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in init_args:
        if key not in params and not takes_any_key:
            close = difflib.get_close_matches(str(key), list(params), n=1)
            hint = f'did you mean "{close[0]}"?' if close else f"the arguments are: {', '.join(params)}."
            return str(key), f'unknown argument "{key}" of {cls.__name__}; {hint}'
    try:
        # The callback's module uses ``from __future__ import annotations``: resolve the strings.
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an unresolvable annotation: no type checks, jsonargparse reports it
        hints = {}
    for key, value in init_args.items():
        if key in hints and not _fits(value, hints[key], load):
            # A common one: YAML reads `inf` as a string.
            spelling = " (infinity is .inf in YAML)" if str(value).lower().lstrip("+-") in ("inf", "infinity") else ""
            return str(key), f'"{key}" must be {_describe(hints[key])}, got {value!r}{spelling}.'
    return None


# ---------------------------------------------------------------------------------------------------------
# Re-reading the raw configuration sources, to find the callback entry jsonargparse refused. jsonargparse
# only says 'Parser key "trainer.callbacks": Does not validate ...' and where the list came from is gone.


def _as_entries(value: Any) -> list[Any]:
    """A ``trainer.callbacks`` value as a list of entries (a single entry or a bare class path allowed)."""
    if value is None:
        return []
    if isinstance(value, list):
        return list(value)
    return [{"class_path": value} if isinstance(value, str) else value]


def _raw_callbacks(
    argv: Sequence[str],
    subcommands: Collection[str],
    defaults: Sequence[str],
    read_config: Callable[[str], Any],
    read_value: Callable[[str], Any],
) -> list[Any]:
    """The ``trainer.callbacks`` list that ``argv`` builds, from the raw (unvalidated) sources.

    Covers what a user writes: ``--config`` files before or after the subcommand, ``--trainer`` configs,
    ``--trainer.callbacks[+]=...`` and ``--trainer.callbacks[.init_args].KEY=VALUE``, and the main
    parser's default config files. Later sources replace the list, ``+=`` appends, like jsonargparse.
    """
    callbacks: list[Any] = []

    def from_config(config: Any, section: str | None) -> None:
        nonlocal callbacks
        if section is not None:  # a config given before the subcommand holds one section per subcommand
            config = config.get(section) if isinstance(config, dict) else None
        trainer = config.get("trainer") if isinstance(config, dict) else None
        if isinstance(trainer, dict) and "callbacks" in trainer:
            callbacks = _as_entries(trainer["callbacks"])

    # The subcommand is the first bare word that is not an option's value.
    at = next(
        (
            i
            for i, token in enumerate(argv)
            if token in subcommands and not (i > 0 and argv[i - 1].startswith("-") and "=" not in argv[i - 1])
        ),
        None,
    )
    subcommand = argv[at] if at is not None else None
    for path in defaults:
        from_config(read_config(path), subcommand)
    spans = [(argv[:at], subcommand), (argv[at + 1 :], None)] if at is not None else [(argv, None)]
    for tokens, section in spans:
        i = 0
        while i < len(tokens):
            name, eq, value = tokens[i].partition("=")
            i += 1
            if not name.startswith("-"):
                continue
            if not eq:  # "--key value"
                if i >= len(tokens) or tokens[i].startswith("--"):
                    continue
                value, i = tokens[i], i + 1
            key = name.lstrip("-")
            if key in ("c", "config"):
                from_config(read_config(value), section)
            elif key == "trainer":
                from_config({"trainer": read_config(value)}, None)
            elif key == _CALLBACKS:
                callbacks = _as_entries(read_config(value))
            elif key == _CALLBACKS + "+":
                callbacks += _as_entries(read_config(value))
            elif key.startswith(_CALLBACKS + ".") and callbacks and isinstance(callbacks[-1], dict):
                # "--trainer.callbacks.init_args.max_norm=2" (or without init_args.) sets the last entry
                arg = key[len(_CALLBACKS) + 1 :].removeprefix("init_args.")
                if "." not in arg:
                    init_args = callbacks[-1].setdefault("init_args", {})
                    if isinstance(init_args, dict):
                        init_args[arg] = read_value(value)
    return callbacks


def _value_reader(parser: ArgumentParser) -> Callable[[str], Any]:
    """Read a command-line or YAML string value the way ``parser`` does (``"1.5"`` -> 1.5; not YAML: as is)."""
    load = get_loader(parser.parser_mode)

    def read(value: str) -> Any:
        try:
            return load(value)
        except Exception:  # not valid YAML: jsonargparse keeps it a string too
            return value

    return read


def _config_reader(read_value: Callable[[str], Any]) -> Callable[[str], Any]:
    """Read a ``--config``-like value: a file's content if it names a file, else inline YAML; None if unreadable."""

    def read(value: str) -> Any:
        try:
            is_file = Path(value).is_file()
        except OSError:  # inline YAML too long for a file name
            is_file = False
        try:
            return read_value(Path(value).read_text()) if is_file else read_value(value)
        except OSError:  # unreadable: leave it to jsonargparse
            return None

    return read


def _first_problem(callbacks: list[Any], load: Callable[[str], Any]) -> str | None:
    """``key path: message`` for the first unknown or mistyped ``init_args`` key of a GradientClipping entry."""
    for i, entry in enumerate(callbacks):
        cls = _clip_class(entry.get("class_path") if isinstance(entry, dict) else None)
        if cls is None:
            continue
        problem = _parse_problem(cls, entry.get("init_args") or {}, load)
        if problem is not None:
            arg, message = problem
            return f"{_CALLBACKS}[{i}].init_args.{arg}: {message}"
    return None


# ---------------------------------------------------------------------------------------------------------

# A mixin: the namespace's LightningCLI comes after it in the MRO. Typed ``Any`` so that mypy accepts its
# ``super()`` calls and either namespace's LightningCLI next to it (they are unrelated classes to mypy).
_MixinBase: Any = object


class GradientClippingCLIMixin(_MixinBase):
    """The one-line errors of :class:`GradientClippingCLI`, for a ``LightningCLI`` of either namespace.

    List it before the ``LightningCLI`` base. It overrides two public hooks of ``LightningCLI``:
    ``init_parser`` (to keep each parser it builds) and ``parse_arguments`` (where both kinds of mistakes
    are reported, before ``LightningCLI`` seeds or instantiates anything).

    Example::

        from lightning.pytorch.cli import LightningCLI

        class MyCLI(GradientClippingCLIMixin, LightningCLI):
            pass
    """

    # Every parser LightningCLI builds (the main one and one per subcommand), to switch their error mode.
    _clip_parsers: tuple[ArgumentParser, ...] = ()

    def init_parser(self, **kwargs: Any) -> Any:
        """``LightningCLI.init_parser``, keeping the parser so ``parse_arguments`` can set its error mode."""
        parser = super().init_parser(**kwargs)
        self._clip_parsers = (*self._clip_parsers, parser)
        return parser

    @contextmanager
    def _parse_errors_raised(self) -> Iterator[None]:
        """Within: a parse error raises ``ArgumentError`` instead of printing the usage block and exiting.

        The subcommand parsers need it too: they would print and exit themselves. Restored afterwards, so
        later parses (LightningCLI re-parses ``ckpt_path`` hyperparameters) behave as the user configured.
        """
        before = [p.exit_on_error for p in self._clip_parsers]
        for p in self._clip_parsers:
            p.exit_on_error = False
        try:
            yield
        finally:
            for p, exit_on_error in zip(self._clip_parsers, before):
                p.exit_on_error = exit_on_error

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """Parse as ``LightningCLI`` does, then report a bad GradientClipping entry in one line.

        Two kinds of mistakes: those jsonargparse refuses while parsing (unknown key, wrong type, a value
        outside a ``Literal``), found again here in the raw sources to name the key; and those only
        ``__init__`` knows (ranges, combinations), found by building each configured callback once. Both
        before ``LightningCLI`` seeds or instantiates anything, so the error line is all the user sees.
        """
        try:
            with self._parse_errors_raised():
                super().parse_arguments(parser, args)
        except ArgumentError as err:
            problem = self._refused_entry(parser, args)
            if problem is not None:
                self._report(parser, problem, err)
            # Not about a GradientClipping entry: parse again, failing the usual way (usage + message, exit 2;
            # or the ArgumentError itself if the user built the parser with exit_on_error=False).
            super().parse_arguments(parser, args)
        problem = self._constructor_problem()
        if problem is not None:
            self._report(parser, problem, None)

    @staticmethod
    def _report(parser: ArgumentParser, problem: str, cause: BaseException | None) -> NoReturn:
        """One ``error:`` line and exit 2; an ``ArgumentError`` instead if the parser should not exit."""
        if not parser.exit_on_error:
            raise ArgumentError(None, _cli_quotes(problem)) from cause
        fail(problem)

    def _refused_entry(self, parser: ArgumentParser, args: Any) -> str | None:
        """The one-line report of a refused GradientClipping entry, or None if no entry is at fault."""
        read_value = _value_reader(parser)
        if isinstance(args, (dict, Namespace)):  # LightningCLI(args={...}): the config is given whole
            config = args.as_dict() if isinstance(args, Namespace) else args
            subcommand = config.get("subcommand")
            section = config.get(subcommand) if isinstance(subcommand, str) else config
            trainer = section.get("trainer") if isinstance(section, dict) else None
            callbacks = _as_entries(trainer.get("callbacks")) if isinstance(trainer, dict) else []
            return _first_problem(callbacks, read_value)
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        # default_config_files holds patterns: read the files they match, in jsonargparse's order.
        defaults = [f for p in parser.default_config_files for f in sorted(glob.glob(os.path.expanduser(p)))]
        callbacks = _raw_callbacks(argv, self.subcommands(), defaults, _config_reader(read_value), read_value)
        return _first_problem(callbacks, read_value)

    def _constructor_problem(self) -> str | None:
        """Build each configured GradientClipping once: ``key path: message`` of the first ``__init__`` error."""
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        callbacks = config.get(_CALLBACKS) or []
        for i, callback in enumerate(callbacks if isinstance(callbacks, list) else [callbacks]):
            cls = _clip_class(getattr(callback, "class_path", None))
            if cls is None:
                continue
            init_args = dict(vars(callback.get("init_args") or Namespace()))
            at = f"{_CALLBACKS}[{i}].init_args"
            for arg, value in init_args.items():  # nested classes (``rule: {class_path: ...}``) first
                if isinstance(value, Namespace) and "class_path" in value:
                    try:
                        init_args[arg] = _build(value)
                    except (ValueError, TypeError) as err:
                        return f"{at}.{arg}.init_args{named_key(str(err))}: {err}"
            try:
                cls(**init_args)
            except (ValueError, TypeError) as err:
                return f"{at}{named_key(str(err))}: {err}"
        return None


def _build(spec: Namespace) -> Any:
    """The object a parsed ``{class_path, init_args}`` describes (what jsonargparse would instantiate)."""
    module, _, name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls(**dict(vars(spec.get("init_args") or Namespace())))


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
        # error: trainer.callbacks[0].init_args.mode: "mode" must be one of 'norm', 'value', 'none', got 'l2'.
    """
