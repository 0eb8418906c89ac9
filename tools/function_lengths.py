"""Code lines of every function and class in the given modules or packages (non-blank, non-comment, docstrings left
out), longest first.

Usage: python tools/function_lengths.py lightning_clip [more files or folders] [--max 60] [--max-class 300]
    [--max-module 500]
Exits 1 when a function is longer than --max, a class than --max-class, or a whole module than --max-module
(default: no limit).
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from pathlib import Path

_LAYOUT_ONLY = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)


def code_lines(source: str, node: ast.AST) -> int:
    docstrings = set()
    for child in ast.walk(node):
        body = getattr(child, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    lines = set()
    # A module has no line numbers of its own: all of it.
    start, end = getattr(node, "lineno", 1), getattr(node, "end_lineno", None) or len(source.splitlines())
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        inside = start <= tok.start[0] <= end and tok.start[0] not in docstrings
        if inside and tok.type not in _LAYOUT_ONLY:
            lines.add(tok.start[0])
    return len(lines)


def _option(argv: list[str], name: str) -> tuple[int | None, list[str]]:
    if name not in argv:
        return None, argv
    i = argv.index(name)
    return int(argv[i + 1]), argv[:i] + argv[i + 2 :]


def _files(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for path in map(Path, paths):
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def main(argv: list[str]) -> int:
    limit, argv = _option(argv, "--max")
    class_limit, argv = _option(argv, "--max-class")
    module_limit, argv = _option(argv, "--max-module")
    rows, classes, modules = [], [], []
    for path in _files(argv):
        source = path.read_text()
        tree = ast.parse(source)
        modules.append((code_lines(source, tree), str(path)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((code_lines(source, node), f"{path}:{node.lineno} {node.name}"))
            elif isinstance(node, ast.ClassDef):
                classes.append((code_lines(source, node), f"{path}:{node.lineno} class {node.name}"))
    print("functions:")
    for n, where in sorted(rows, reverse=True)[:10]:
        print(f"{n:4d}  {where}")
    print("classes:")
    for n, where in sorted(classes, reverse=True)[:5]:
        print(f"{n:4d}  {where}")
    print("modules:")
    for n, where in sorted(modules, reverse=True)[:5]:
        print(f"{n:4d}  {where}")
    too_long = limit is not None and rows and max(rows)[0] > limit
    too_large = class_limit is not None and classes and max(classes)[0] > class_limit
    too_big = module_limit is not None and modules and max(modules)[0] > module_limit
    return 1 if too_long or too_large or too_big else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
