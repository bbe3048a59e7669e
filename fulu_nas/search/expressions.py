"""Arithmetic and comparisons over search parameters, for a space's ``derived`` values and
``constraints`` (``"top_k <= num_experts"``, ``"512 // top_k"``).

Parsed with :mod:`ast` and evaluated by walking a whitelist of node types: no attribute access,
no calls except ``min``/``max``/``abs``, nothing that could run code from a YAML file.
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


class ExpressionError(ValueError):
    """The text is not an expression of the allowed form."""


@dataclass(frozen=True)
class Expression:
    text: str
    tree: ast.Expression
    names: frozenset[str]

    def __call__(self, values: Mapping[str, object]):
        return _eval(self.tree.body, values)


def parse_expression(text: object) -> Expression:
    """Parse ``text``; :class:`ExpressionError` says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ExpressionError(f"expected an expression string, got {text!r}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"cannot parse {text!r}: {e.msg}") from None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            if node.id not in _FUNCTIONS:
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


def _eval(node: ast.AST, values: Mapping[str, object]):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_eval(node.left, values), _eval(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_eval(node.operand, values))
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
