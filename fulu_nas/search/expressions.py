"""Arithmetic and comparisons over search parameters, for a space's ``derived`` values and
``constraints`` (``"top_k <= num_experts"``, ``"512 // top_k"``).

Parsed with :mod:`ast` and evaluated by walking a whitelist of node types: no attribute access,
no calls except ``min``/``max``/``abs``, nothing that could run code from a YAML file. Evaluation
is bounded too, so that a line of YAML cannot hang the search or take the machine's memory
(``9**9**9**9``, ``'ab' * 10**10``): integers have at most :data:`MAX_INT_BITS` bits, strings at
most :data:`MAX_STR_LEN` characters (:class:`ExpressionTooLarge` otherwise), an expression at most
:data:`MAX_LENGTH` characters, and ``%`` is arithmetic only (never string formatting).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from dataclasses import dataclass

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_FUNCTIONS = {"min": min, "max": max, "abs": abs}
# Architecture fields are machine integers, and strings only name choices (router == 'hash'): these
# bounds are far above any sensible value and far below what takes noticeable time or memory.
MAX_INT_BITS = 64
MAX_STR_LEN = 1000
# Also bounds the nesting that parsing and evaluation recurse through.
MAX_LENGTH = 500


class ExpressionError(ValueError):
    """The text is not an expression of the allowed form."""


class ExpressionTooLarge(ExpressionError):
    """Evaluating the expression would make a value beyond the bounds above: the expression itself
    is at fault, whatever the values, so callers report it instead of skipping the value."""


@dataclass(frozen=True)
class Expression:
    text: str
    tree: ast.Expression
    names: frozenset[str]

    def __call__(self, values: Mapping[str, object]):
        try:
            return _eval(self.tree.body, values)
        except ExpressionTooLarge as e:
            raise ExpressionTooLarge(f"{self.text!r}: {e}") from None


def parse_expression(text: object) -> Expression:
    """Parse ``text``; :class:`ExpressionError` says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"expected an expression string, got {text!r}")
    if len(text.strip()) > MAX_LENGTH:
        raise ExpressionError(f"{text[:40]!r}...: longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"cannot parse {text!r}: {e.msg}") from None
    # Only the callee of a call is a function: ``max`` on its own is a name like any other, which the
    # space then reports as unknown (leaving it out of the names made its evaluation a KeyError).
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if id(node) not in called:
                names.add(node.id)
        elif isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS) or node.keywords:
                raise ExpressionError(f"{text!r}: only min(), max() and abs() may be called")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float, str, bool)) and node.value is not None:
                raise ExpressionError(f"{text!r}: unsupported constant {node.value!r}")
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Load,
                                   ast.And, ast.Or, *_BINARY, *_COMPARE, *_UNARY)):
            raise ExpressionError(f"{text!r}: {type(node).__name__} is not allowed")
    return Expression(text.strip(), tree, frozenset(names))


def _bounded(value):
    """``value``, if within the bounds (else :class:`ExpressionTooLarge`)."""
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ExpressionTooLarge(f"an integer of {value.bit_length()} bits is too large (at most {MAX_INT_BITS})")
    if isinstance(value, str) and len(value) > MAX_STR_LEN:
        raise ExpressionTooLarge(f"a string of {len(value)} characters is too large (at most {MAX_STR_LEN})")
    return value


def _binary(op: type, left, right):
    """``left op right``, refusing before computing what would exceed the bounds: a power's size
    grows with its exponent, a repeated string's with its count."""
    if op is ast.Pow and isinstance(left, int) and isinstance(right, int) and right > MAX_INT_BITS and abs(left) > 1:
        raise ExpressionTooLarge(f"{left} ** {right} is too large (integers have at most {MAX_INT_BITS} bits)")
    if op is ast.Mult and (isinstance(left, str) or isinstance(right, str)):
        text, count = (left, right) if isinstance(left, str) else (right, left)
        if isinstance(count, int) and len(text) * count > MAX_STR_LEN:
            raise ExpressionTooLarge(f"a string of {len(text)} characters repeated {count} times is too large "
                                     f"(at most {MAX_STR_LEN} characters)")
    if op is ast.Mod and isinstance(left, str):
        raise TypeError("'%' is the remainder here, not string formatting")
    return _bounded(_BINARY[op](left, right))


def _eval(node: ast.AST, values: Mapping[str, object]):
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return _binary(type(node.op), _eval(node.left, values), _eval(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _bounded(_UNARY[type(node.op)](_eval(node.operand, values)))
    if isinstance(node, ast.BoolOp):
        results = (_eval(v, values) for v in node.values)
        return all(results) if isinstance(node.op, ast.And) else any(results)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, values)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _eval(right_node, values)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Call):
        return _FUNCTIONS[node.func.id](*(_eval(a, values) for a in node.args))
    raise ExpressionError(f"{type(node).__name__} is not allowed")  # unreachable after parse_expression
