"""A safe, bounded evaluator for integer arithmetic expressions (+ - * / and parentheses).

Used by the synthetic tasks (synthetic.py) to compute reference answers and to check
countdown completions. Model output is never handed to ``eval``: the text is checked
against a character whitelist and a length cap, parsed with ``ast.parse`` (which
cannot run anything), and its tree is walked with only these nodes allowed:
integer literals, ``+ - * /`` (``/`` is exact division, done with ``Fraction``) and,
when asked for, unary minus. ``**``, ``//``, ``%``, names, calls and floats are
rejected, and the text is at most ``max_chars`` long, so results stay small (no
exponentiation; at most ``max_chars`` digits in all).

    >>> safe_eval("(50-25)*3")
    Fraction(75, 1)
    >>> integer_literals("(50-25)*3")
    [50, 25, 3]
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

_ALLOWED_CHARS = re.compile(r"[0-9+\-*/() \t]*")
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


class ExprError(ValueError):
    """The text is not an allowed arithmetic expression (the message says why)."""


def parse_expr(
    text: str, *, max_chars: int = 200, max_nodes: int = 64, allow_unary_minus: bool = False
) -> ast.expr:
    """Parse and validate an expression; raise ExprError describing the first problem."""
    if not isinstance(text, str):
        raise ExprError(f"expression must be text, got {type(text).__name__}")
    text = text.strip()
    if not text:
        raise ExprError("empty expression")
    if len(text) > max_chars:
        raise ExprError(f"expression longer than {max_chars} characters")
    if not _ALLOWED_CHARS.fullmatch(text):
        bad = next(c for c in text if not _ALLOWED_CHARS.fullmatch(c))
        raise ExprError(f"character {bad!r} is not allowed (only digits, + - * / and parentheses)")
    if "**" in text or "//" in text:
        raise ExprError("'**' and '//' are not allowed")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ExprError(f"not a valid expression ({type(exc).__name__})") from None
    for count, node in enumerate(ast.walk(tree.body), start=1):
        if count > max_nodes:
            raise ExprError(f"expression has more than {max_nodes} nodes")
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, _BINOPS):
                raise ExprError(f"operator {type(node.op).__name__} is not allowed")
        elif isinstance(node, ast.UnaryOp):
            if not (allow_unary_minus and isinstance(node.op, ast.USub)):
                raise ExprError("unary operators are not allowed")
        elif isinstance(node, ast.Constant):
            if type(node.value) is not int:
                raise ExprError(f"literal {node.value!r} is not an integer")
        elif not isinstance(node, (ast.operator, ast.unaryop)):
            raise ExprError(f"{type(node).__name__} is not allowed")
    return tree.body


def evaluate(node: ast.expr) -> Fraction:
    """Exact value of a tree accepted by ``parse_expr``; ExprError on division by zero."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        return -evaluate(node.operand)
    if isinstance(node, ast.BinOp):
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ExprError("division by zero")
        return left / right
    raise ExprError(f"{type(node).__name__} is not allowed")


def safe_eval(text: str, **limits: int | bool) -> Fraction:
    """Parse, validate and evaluate ``text`` exactly (see ``parse_expr`` for the limits)."""
    return evaluate(parse_expr(text, **limits))  # type: ignore[arg-type]


def integer_literals(text_or_node: str | ast.expr) -> list[int]:
    """The integer literals of an expression, left to right."""
    node = parse_expr(text_or_node) if isinstance(text_or_node, str) else text_or_node
    found: list[tuple[int, int, int]] = [
        (n.lineno, n.col_offset, n.value) for n in ast.walk(node) if isinstance(n, ast.Constant)
    ]
    return [value for _, _, value in sorted(found)]
