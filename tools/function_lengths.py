"""Code lines of every function in the given modules (non-blank, non-comment, docstrings left out), longest first.

Usage: python tools/function_lengths.py lightning_clip/engine.py [more files] [--max 60]
Exits 1 when a function is longer than --max (default: no limit).
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize

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
    start, end = node.lineno, node.end_lineno
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        inside = start <= tok.start[0] <= end and tok.start[0] not in docstrings
        if inside and tok.type not in _LAYOUT_ONLY:
            lines.add(tok.start[0])
    return len(lines)


def main(argv: list[str]) -> int:
    limit = None
    if "--max" in argv:
        i = argv.index("--max")
        limit = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    rows = []
    for path in argv:
        with open(path) as f:
            source = f.read()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((code_lines(source, node), f"{path}:{node.lineno} {node.name}"))
    for n, where in sorted(rows, reverse=True)[:10]:
        print(f"{n:4d}  {where}")
    return 1 if limit is not None and rows and max(rows)[0] > limit else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
