"""Checking a ``torch.export`` archive (``.pt2``) before ``torch.export.load`` reads it.

``torch.export.load`` must not be run on a file you have not verified. Besides the graph (JSON)
and raw tensor bytes, an archive can hold records that torch 2.13 passes to Python's full
unpickler, which runs whatever code the pickle names:

- a weight or constant whose entry in ``data/{weights,constants}/<model>_*_config.json`` says
  ``use_pickle`` (read with ``torch.load(weights_only=False)``);
- a constant ``custom_obj_*`` (TorchScript's pickle loader) or ``opaque_obj_*`` (``pickle.loads``);
- the legacy ``data/weights/<model>.pt`` and ``data/constants/<model>.pt``, and the example
  inputs ``data/sample_inputs/<model>.pt``, which torch reads with ``weights_only=True`` and, when
  that fails, again with ``weights_only=False``;
- the pre-2.8 layout (``version``, ``serialized_*.pt``) that torch falls back to, with Python's
  ``zipfile``, when the archive does not load;

and ``data/aotinductor/`` holds compiled shared libraries that it loads (native code). The graph
(``models/<model>.json``) runs code too: the loader parses every shape expression (``expr_str``) with
sympy, which ``eval``s it; the module of ``ExportedProgram.module()`` ``exec``s the ``guards_code``
strings on every call; and a node's ``target`` names any attribute path under ``torch``, ``math`` or
``_operator``, called when the program runs.

:func:`archive_problems` accepts only what ``torch.export.save`` writes for a program of plain
tensors whose graph calls ATen operators (and the few Python operators shape arithmetic uses), whose
shape expressions are sympy arithmetic over shape symbols and which has no guards code. Even so, a
file is loaded only when its SHA-256 is the one recorded at export; :func:`load_program` checks both.

This file is shipped inside the MLflow model (``code/pt2_check.py``), which runs with torch, numpy
and MLflow only: it imports torch and the standard library, nothing from fulu_nas.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch.export.pt2_archive import PT2ArchiveReader
from torch.export.pt2_archive import constants as pt2

SHA256 = re.compile(r"[0-9a-f]{64}")
# Written by torch's zip writer for every archive (format, version, byte order, serialization id).
HOUSEKEEPING = {pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, "byteorder", ".data/version",
                ".data/serialization_id"}


# What a shape expression may contain: sympy arithmetic over shape symbols, as torch.export writes it
# (e.g. "Mul(Integer(2), Symbol('s6', positive=True, integer=True))"). No attribute access, no
# subscripts, no other names: sympify evaluates the string.
EXPRESSION_NAMES = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Add", "Mul", "Pow", "Min", "Max", "Abs", "Mod", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "true", "false", "True", "False", "FloorDiv", "CeilDiv",
    "CleanDiv", "PythonMod", "ModularIndexing", "Where", "FloorToInt", "CeilToInt", "TruncToInt", "RoundToInt",
    "TruncToFloat", "ToFloat", "IntTrueDiv", "FloatTrueDiv", "PowByNatural", "FloatPow", "LShift", "RShift",
    "positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite"})
EXPRESSION_TOKEN = re.compile(r"\s+|'[a-z]+\d+'|[A-Za-z_]\w*|\d+(?:\.\d+)?(?:e[+-]?\d+)?|[(),=+\-*/]")
# The callables a node may name: ATen operator overloads (not the one that reads a file, see
# aten_overload), and the Python operators and torch.sym_* functions that shape arithmetic uses.
ATEN_TARGET = re.compile(r"torch\.ops\.aten\.(\w+)\.(\w+)")
PYTHON_TARGETS = frozenset({f"_operator.{name}" for name in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt",
    "ge", "and_", "or_", "not_")} | {f"torch.sym_{name}" for name in ("int", "float", "max", "min", "not", "sqrt",
                                                                    "ite")} | {"math.ceil", "math.floor",
                                                                               "math.trunc", "math.sqrt"})


def aten_overload(target: str) -> bool:
    """Whether ``target`` names a real ATen operator overload, ``torch.ops.aten.<operator>.<overload>``
    (not ``from_file``, which reads a file). torch's loader resolves a target with ``getattr``, so a name
    of the same form can reach attributes that are no operator (``torch.ops.aten.add.__setattr__``)."""
    match = ATEN_TARGET.fullmatch(target)
    if match is None or match[1] == "from_file":
        return False
    operator, overload = match.groups()
    try:
        packet = getattr(torch.ops.aten, operator)  # torch looks the operator up by name; no code of the file's
    except Exception:  # no such operator (torch raises AttributeError or RuntimeError, depending on the name)
        return False
    return isinstance(packet, torch._ops.OpOverloadPacket) and overload in packet.overloads()


class UnsafeProgramError(ValueError):
    """A ``.pt2`` file that is not the exported one, or from which ``torch.export.load`` would run code."""


def read_verified(path: str | Path, expected_sha256: str) -> bytes:
    """The bytes of ``path`` if their SHA-256 is ``expected_sha256`` (read once: what is checked is
    what gets loaded). The hash is taken as ``fulu_nas.load`` takes one (any case, surrounding blanks);
    anything but a SHA-256 is ValueError."""
    expected = expected_sha256.strip().lower() if isinstance(expected_sha256, str) else None
    if expected is None or not SHA256.fullmatch(expected):
        raise ValueError(f"expected_sha256: {expected_sha256!r} is not a SHA-256 (64 hex digits: the model.pt2 entry "
                         "of the export's checksums.json)")
    data = Path(path).read_bytes()
    if (actual := hashlib.sha256(data).hexdigest()) != expected:
        raise UnsafeProgramError(f"{path}: checksum mismatch: its SHA-256 is {actual}, not the expected {expected} "
                                 "(the file changed since export, or the hash given is not its own: model.pt2's "
                                 "entry in checksums.json, not the folder's fingerprint)")
    return data


def _payloads(reader: PT2ArchiveReader, config_name: str, folder: str, prefix: str,
              records: set[str], problems: list[str]) -> set[str]:
    """The tensor records a weights/constants config names; what would be unpickled goes to problems."""
    if config_name not in records:
        problems.append(f"{config_name}: missing (torch would read a pickled {folder}<model>.pt instead)")
        return set()
    try:
        entries = json.loads(reader.read_string(config_name))["config"]
        items = [(fqn, meta.get("path_name", ""), meta.get("use_pickle")) for fqn, meta in entries.items()]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problems.append(f"{config_name}: unreadable ({e})")
        return set()
    names = set()
    for fqn, path_name, use_pickle in items:
        if use_pickle:
            problems.append(f"{folder}{path_name}: pickled ({fqn} has use_pickle)")
        elif not (isinstance(path_name, str) and path_name.startswith(prefix) and "/" not in path_name):
            problems.append(f"{folder}{path_name}: not a plain tensor ({fqn}), torch would unpickle it")
        else:
            names.add(folder + path_name)
    return names


def expression_problem(expression: object) -> str | None:
    """Why sympy must not evaluate this shape expression; None when it is arithmetic over symbols."""
    if not isinstance(expression, str):
        return f"a shape expression that is not a string ({type(expression).__name__})"
    position = 0
    while position < len(expression):
        token = EXPRESSION_TOKEN.match(expression, position)
        if token is None:
            return f"a shape expression with {expression[position:position + 20]!r}"
        word = token.group()
        if (word[0].isalpha() or word[0] == "_") and word not in EXPRESSION_NAMES:
            return f"a shape expression naming {word!r}"
        position = token.end()
    return None


def graph_problems(program: object, record: str) -> list[str]:
    """What in a program's graph (``models/<model>.json``, parsed) would run code other than the
    arithmetic and ATen operators of a model: shape expressions beyond sympy arithmetic, guards code,
    and node targets outside ATen and shape arithmetic."""
    problems: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "expr_str" and (problem := expression_problem(item)):
                    problems.add(f"{record}: {problem}, which sympy would evaluate")
                elif key == "guards_code" and item:
                    problems.add(f"{record}: guards code, which the loaded module would execute on every call")
                elif key == "target" and isinstance(item, str) and not (
                        aten_overload(item) or item in PYTHON_TARGETS):
                    problems.add(f"{record}: a node calling {item[:80]!r}, not an ATen operator")
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(program)
    return sorted(problems)


NOT_AN_ARCHIVE = "not a torch.export archive"


def archive_problems(data: bytes) -> list[str]:
    """Why ``torch.export.load`` (or the loaded program) would run code from this archive: pickles, native
    code, a graph beyond arithmetic and ATen operators; [] when nothing."""
    try:
        reader = PT2ArchiveReader(io.BytesIO(data))  # torch's own zip reader: what it lists is what it loads
        records = set(reader.get_file_names())
        with zipfile.ZipFile(io.BytesIO(data)) as z:  # the reader of torch's fallback path
            names = z.namelist()
    # ValueError: torch's reader seeks before the start of a file cut inside its zip directory
    except (RuntimeError, AssertionError, ValueError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        # torch's first sentence names what is wrong; the rest of a miniz error is advice to torch's developers
        why = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        return [f"{NOT_AN_ARCHIVE} (cut short, damaged or another kind of file: {why}); torch.export.load would "
                "retry it as a legacy archive, whose tensors are pickles"]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or len(names) != len(set(names)) or \
            set(names) != {f"{next(iter(roots))}/{record}" for record in records}:
        return ["its zip directory reads differently with torch's reader and with Python's zipfile"]

    problems: list[str] = []
    allowed = set(HOUSEKEEPING)
    models = {r[len(pt2.MODELS_DIR):-len(".json")] for r in records
              if r.startswith(pt2.MODELS_DIR) and r.endswith(".json")}
    if not models:
        problems.append(f"no program ({pt2.MODELS_DIR}*.json)")
    for model in sorted(models):
        program_record = pt2.MODELS_FILENAME_FORMAT.format(model)
        allowed.add(program_record)
        try:
            program = json.loads(reader.read_string(program_record))
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"{program_record}: not a JSON graph ({e})")
        else:
            problems += graph_problems(program, program_record)
        for config_format, folder, prefix in (
                (pt2.WEIGHTS_CONFIG_FILENAME_FORMAT, pt2.WEIGHTS_DIR, pt2.WEIGHT_FILENAME_PREFIX),
                (pt2.CONSTANTS_CONFIG_FILENAME_FORMAT, pt2.CONSTANTS_DIR, pt2.TENSOR_CONSTANT_FILENAME_PREFIX)):
            config_name = config_format.format(model)
            allowed |= {config_name} | _payloads(reader, config_name, folder, prefix, records, problems)
        sample = pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(model)
        allowed.add(sample)
        if sample not in records:
            problems.append(f"{sample}: missing")
        elif raw := reader.read_bytes(sample):
            try:  # torch's restricted unpickler (tensors and containers only); torch would retry in full
                torch.load(io.BytesIO(raw), weights_only=True)
            except Exception as e:
                problems.append(f"{sample}: not loadable with weights_only=True ({type(e).__name__}), "
                                "so torch would unpickle it in full")
    for record in sorted(records - allowed):
        if record.startswith(pt2.EXTRA_DIR):
            continue  # read as text only
        if record.startswith(pt2.AOTINDUCTOR_DIR):
            problems.append(f"{record}: compiled code (torch loads it as a shared library)")
        else:
            problems.append(f"{record}: not part of a program of plain tensors (torch may unpickle it)")
    return problems


def check_archive(data: bytes, name: str | Path) -> None:
    """Raise :class:`UnsafeProgramError` naming ``name`` if ``torch.export.load`` would run code from ``data``."""
    problems = archive_problems(data)
    if problems and problems[0].startswith(NOT_AN_ARCHIVE):  # a file cut short is more likely than an attack
        raise UnsafeProgramError(f"{name}: refused: {problems[0]}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UnsafeProgramError(f"{name}: refused: torch.export.load would run code from it (unpickle, load "
                                 f"native code or evaluate what it holds): {shown}")


def load_program(path: str | Path, expected_sha256: str) -> torch.export.ExportedProgram:
    """``torch.export.load`` of ``path`` after checking its SHA-256 and :func:`check_archive`."""
    data = read_verified(path, expected_sha256)
    check_archive(data, path)
    with warnings.catch_warnings():
        # The weights are read from the archive's (immutable) bytes, of which torch warns that tensors
        # over them are not writable; nothing writes to a loaded program's weights.
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.export.load(io.BytesIO(data))  # the bytes that were checked, not the path again
