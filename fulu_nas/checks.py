"""Checks of user input shared by the layers (the trainer's configuration, the search's settings, the
export's loader): each failed number check appends one problem naming its key, so that a caller can list
every problem at once in a :class:`~fulu_nas.errors.FuluConfigError`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import FuluConfigError
from .moe.field_types import is_finite_number

if TYPE_CHECKING:
    from torch import Tensor


def check_int(name: str, v: object, problems: list[str], low: int, high: int | None = None) -> bool:
    """Whether ``v`` is an integer (not a bool) in ``[low, high]``; if not, the problem names ``name``."""
    if isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high):
        return True
    problems.append(f"{name}: expected an integer {'>= ' + str(low) if high is None else f'in [{low}, {high}]'}, "
                    f"got {v!r}")
    return False


def check_number(name: str, v: object, problems: list[str], low: float, high: float = math.inf,
                 low_open: bool = False) -> bool:
    """Whether ``v`` is a finite number (not a bool) from ``low`` (excluded if ``low_open``) to ``high``;
    NaN and infinities never are: a study of them would only fail its trials."""
    if is_finite_number(v) and (v > low if low_open else v >= low) and v <= high:
        return True
    if high < math.inf:
        bounds = f" in [{low}, {high}]"
    else:
        bounds = f" {'>' if low_open else '>='} {low}" if low > -math.inf else ""
    problems.append(f"{name}: expected a finite number{bounds}, got {v!r}")
    return False


def device_problem(spec: object, key: str) -> str | None:
    """Why ``spec`` names no device of this machine (None: it does, or it is the CPU or meta): a GPU
    setting on a machine without that GPU must not quietly run on the CPU, nor fail inside torch in its
    own words (an AssertionError, a list of every device type torch knows)."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        return f"{key}: {spec!r}: not a device (e.g. 'cpu', 'cuda', 'cuda:1')"
    if device.type in ("cpu", "meta"):
        return None
    try:
        backend = torch.get_device_module(device)  # torch.cuda, torch.mps, torch.xpu, ...
    except RuntimeError:  # a type this torch build has no backend for
        backend = None
    if backend is None or not backend.is_available():
        return f"{key}: {spec!r}: torch {torch.__version__} sees no {device.type.upper()} device here"
    count = backend.device_count()
    if device.index is not None and device.index >= count:
        return f"{key}: {spec!r}: not a device here (visible: {device.type}:0 to {device.type}:{count - 1})"
    return None


def first_few(names: list[str], n: int = 3) -> str:
    """The first ``n`` names, and how many more (a configuration can be off by any number of tensors)."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def nonfinite_tensors(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the floating-point tensors among ``named`` (name, tensor pairs) that hold NaN or an
    infinity: weights that load, train or export without a word and only show up later as garbage. A
    meta tensor (a model built to be loaded into) holds no values and passes."""
    return [name for name, tensor in named if tensor.is_floating_point() and not tensor.is_meta
            and not _all_finite(tensor)]


def _all_finite(tensor: Tensor) -> bool:
    """Whether every value of ``tensor`` is finite, looked at in slices of at most 2^24 values along its first
    dimension: ``isfinite`` of a whole fused expert tensor (billions of values) would first make a boolean
    copy of it on its device."""
    import torch

    if tensor.dim() == 0 or tensor.numel() <= 1 << 24:
        return bool(torch.isfinite(tensor).all())
    rows = max(1, (1 << 24) // max(1, tensor[0].numel()))
    return all(bool(torch.isfinite(part).all()) for part in tensor.split(rows))


def sqlite_file(url: str) -> Path:
    """The file of a ``sqlite:///path`` URL, without the query SQLAlchemy hands the driver
    (``?timeout=30``): a check reading ``path?timeout=30`` found no database where the search made one."""
    return Path(url[len("sqlite:///"):].split("?", 1)[0])


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    if url.startswith("journal:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if "password" in parsed.query:  # the driver's own parameter (?password=...), which psycopg takes too
            parsed = parsed.update_query_dict({"password": "MASKED"})
        return parsed.render_as_string(hide_password=True).replace("password=MASKED", "password=***")
    except Exception:  # not a database URL (http://...): mask user:pass@ by hand
        scheme, sep, rest = url.partition("://")
        if sep and "@" in rest.split("/", 1)[0]:
            creds, host = rest.split("@", 1)
            if ":" in creds:  # a user alone (http://user@host) has no password to hide
                return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
        return url


def url_without_password(url: str) -> str:
    """``url`` as a command a user copies should give it: without its password, which the database's client
    then reads from its own place (PostgreSQL's PGPASSWORD or ~/.pgpass), where ``***`` in its stead failed
    to connect. A URL that is not a database's keeps its form, masked (:func:`mask_url`)."""
    if url.startswith("journal:"):
        return url
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:
        return mask_url(url)
    if parsed.password is None and "password" not in parsed.query:
        return url
    # URL.set() takes None for "unchanged": the named tuple's own replace drops the password
    parsed = parsed._replace(password=None).difference_update_query(["password"])
    return parsed.render_as_string(hide_password=False)


def is_tracking_server(uri: str) -> bool:
    """Whether an MLflow tracking URI names a server (``http``/``https``, in any case, as MLflow reads
    schemes) rather than a database."""
    return uri.split(":", 1)[0].lower() in ("http", "https")


def server_address(uri: str) -> str:
    """An MLflow tracking server's address as a browser opens it: without the credentials an
    ``http://user:password@host`` URI carries (the browser asks for them)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def check_sqlite_database(path: Path, key: str) -> None:
    """FuluConfigError unless the existing file ``path`` is a SQLite database (a damaged one, or a folder,
    failed only once a command had written its folder)."""
    import sqlite3

    roll_back_crashed_write(path)
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            db.execute("PRAGMA schema_version").fetchone()
    except sqlite3.Error as e:
        journal = path.with_name(path.name + "-journal")
        if journal.is_file():  # a crashed write's, which could not be rolled back from here
            raise FuluConfigError(f"{key}: {path} has the rollback journal of a write that was cut off ({journal}), "
                                  f"which only a process that may write {path.parent} can roll back ({e}): run the "
                                  "command as a user who may, once") from None
        raise FuluConfigError(f"{key}: {path} is not a SQLite database ({e})") from None


def roll_back_crashed_write(path: Path) -> None:
    """Where the SQLite file ``path`` has a rollback journal, open it for writing once: a write cut off by a
    crash (a search killed while MLflow or Optuna wrote) left the journal, which SQLite rolls back when a
    writer next opens the file, and a read-only connection cannot, so the read-only checks took the
    database for no database ("attempt to write a readonly database"). A live writer's journal is left
    to it (SQLite rolls back only a journal no process holds). A failure here is the check's to report."""
    import sqlite3

    if not path.with_name(path.name + "-journal").is_file():
        return
    with contextlib.suppress(sqlite3.Error), contextlib.closing(sqlite3.connect(path, timeout=30)) as db:
        db.execute("PRAGMA schema_version").fetchone()


OPTUNA_TABLES = {"studies", "trials", "version_info"}
MLFLOW_TABLES = {"experiments"}


def sqlite_tables(url: str) -> set[str]:
    """The tables of the SQLite database of ``url``; none where there is no such file yet."""
    import sqlite3

    path = sqlite_file(url)
    if not url.startswith("sqlite:") or not path.is_file():
        return set()
    roll_back_crashed_write(path)
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def refuse_study_database(tracking_uri: str, key: str) -> None:
    if OPTUNA_TABLES <= sqlite_tables(tracking_uri):
        raise FuluConfigError(f"{key}: {mask_url(tracking_uri)} is an Optuna study database, not an MLflow "
                              "one (a search keeps its runs in mlflow.db)")


def server_tables(uri: str, key: str) -> set[str]:
    """The table names of the database server's ``uri`` (read only); FuluConfigError naming ``key`` when it
    cannot be reached."""
    from sqlalchemy import create_engine, inspect
    from sqlalchemy.exc import SQLAlchemyError

    engine = create_engine(uri)
    try:
        return set(inspect(engine).get_table_names())
    except SQLAlchemyError as e:
        reason = " ".join(str(getattr(e, "orig", e)).split())[:300]
        raise FuluConfigError(f"{key}: cannot connect to {mask_url(uri)}: {reason}") from None
    finally:
        engine.dispose()


def check_tracking_database_exists(uri: str, key: str = "tracking.uri") -> None:
    """FuluConfigError unless a SQLite tracking URI names an existing MLflow database, for the commands that
    read runs or the registry from it: MLflow opening a SQLite file makes its tables there first, so a
    missing file became an empty database and a study's optuna.db gained MLflow's tables. Other URIs pass
    (``search.storage.probe_tracking`` reaches them)."""
    if uri.startswith(("postgresql", "mysql", "mssql", "oracle")):  # a database server's: read its table names
        if not MLFLOW_TABLES <= server_tables(uri, key):
            # MLflow's client would make its tables there (writing to a database given by mistake)
            raise FuluConfigError(f"{key}: {mask_url(uri)} holds no MLflow runs (no MLflow tables): is it the "
                                  "tracking.uri the search was run with?")
        return
    if not uri.startswith("sqlite:"):
        return
    if not sqlite_file(uri).is_file():
        raise FuluConfigError(f"{key}: {mask_url(uri)}: no such database (is it a search's outputs/STUDY/mlflow.db?)")
    check_sqlite_database(sqlite_file(uri), key)
    refuse_study_database(uri, key)
    if not MLFLOW_TABLES <= sqlite_tables(uri):
        raise FuluConfigError(f"{key}: {mask_url(uri)} is not an MLflow tracking database (a search keeps its "
                              "runs in outputs/STUDY/mlflow.db)")


def strict_yaml(text: str) -> object:
    """``yaml.safe_load`` of a file a user writes, refusing a key given twice in one mapping (PyYAML keeps the
    last, so the first setting was dropped without a word) with a ``yaml.YAMLError`` that says where. Keys a
    merge (``<<: *anchor``) brings in may be set again: that is what a merge is for."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    again = key in seen
                except TypeError:  # an unhashable key: the constructor names it
                    continue
                if again:
                    raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                            f"the key {key!r} given a second time",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=Loader)  # a SafeLoader: no Python objects


def yaml_problem(error: Exception) -> str:
    """A YAML parser's error in one line: its problem and where (PyYAML's own message spans several
    lines and quotes the text); the caller names the file."""
    mark, context_mark = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
    if mark is None:
        return " ".join(str(error).split())
    problem = f"{getattr(error, 'problem', None) or 'cannot parse'} at line {mark.line + 1}, column {mark.column + 1}"
    if context_mark is not None and getattr(error, "context", None):
        problem += f" ({error.context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    return problem


def is_folder_name(name: object) -> bool:
    """Whether ``name`` names one folder inside another: a study's folder is ``outputs/<study.name>``
    (by default ``<space name>-<task>``), and ``..`` or ``.`` put its optuna.db, mlflow.db and .hydra/ in
    the folder above or the current one, a separator in a folder below (or, with \\, elsewhere on
    Windows)."""
    return (isinstance(name, str) and bool(name.strip()) and name not in (".", "..")
            and not any(c in name for c in "/\\\0"))
