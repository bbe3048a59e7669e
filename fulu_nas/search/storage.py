"""Where studies and runs live: Optuna storage URLs and MLflow tracking URIs.

``check_*`` validate a URL's form (scheme, driver installed) without touching anything;
``probe_*`` connect to a remote one, so that a wrong host or password is reported as bad input
before a study or run is created. Passwords never appear in messages or tracked parameters.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..checks import (
    MLFLOW_TABLES,
    OPTUNA_TABLES,
    check_sqlite_database,
    mask_url,
    refuse_study_database,
    sqlite_file,
    sqlite_tables,
)
from ..errors import FuluConfigError

T = TypeVar("T")

_RDB_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql", "mysql+pymysql")
_TRACKING_SCHEMES = ("http", "https", *_RDB_SCHEMES)


def journal_path(url: str) -> Path:
    """The file of a ``journal:///abs/path`` or ``journal:relative/path`` URL."""
    return Path(url[len("journal:"):].removeprefix("//"))


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower()


def check_storage_url(url: object) -> None:
    if not isinstance(url, str) or ":" not in url:
        raise FuluConfigError(f"study.storage: expected a URL such as sqlite:///path/optuna.db, "
                              f"postgresql://user:pass@host/db or journal:///path/file.log, got {url!r}")
    scheme = _scheme(url)
    if scheme == "journal":
        path = journal_path(url)
        if str(path) in ("", ".") or path.is_dir():
            raise FuluConfigError(f"study.storage: {url!r} names a folder, not a journal file (e.g. "
                                  "journal:///path/study.log)")
        if not path.parent.is_dir():
            raise FuluConfigError(f"study.storage: the folder of journal file {str(path)!r} does not exist")
        return
    if scheme not in _RDB_SCHEMES:
        raise FuluConfigError(f"study.storage: unsupported scheme {scheme!r} in {mask_url(url)!r} (use sqlite, "
                              f"postgresql, mysql or journal)")
    _check_rdb_url(url, "study.storage")


def _check_rdb_url(url: str, key: str) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise FuluConfigError(f"{key}: malformed URL {mask_url(url)!r}: {e}") from None
    except ValueError:  # SQLAlchemy reads the port with int(): a traceback
        raise FuluConfigError(f"{key}: malformed URL {mask_url(url)!r}: its port is not a number") from None
    try:
        parsed.get_dialect().import_dbapi()
    except ImportError as e:
        raise FuluConfigError(f"{key}: {parsed.drivername} needs the Python module {e.name!r}, which is not "
                              "installed") from None
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise FuluConfigError(f"{key}: an in-memory SQLite database cannot be shared; give a file path")
        if not Path(database).parent.is_dir():
            raise FuluConfigError(f"{key}: the folder of {database!r} does not exist")
        _check_sqlite_query(parsed, url, key)


def _check_sqlite_query(parsed, url: str, key: str) -> None:
    """The query arguments of a SQLite URL as the driver reads them: one it cannot convert (``timeout=abc``)
    failed with a traceback once the search had written its folder (and, in ``tracking.uri``, made its
    study); one it does not take (``foo=1``, or ``mode=ro`` without ``uri=true``) was ignored, with SQLAlchemy's
    warnings on the console."""
    import warnings

    from sqlalchemy.exc import SAWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SAWarning)
        try:
            parsed.get_dialect()().create_connect_args(parsed)
        except (TypeError, ValueError) as e:
            raise FuluConfigError(f"{key}: a query argument of {mask_url(url)!r} is not what the SQLite driver "
                                  f"takes ({e})") from None
    if ignored := [w for w in caught if issubclass(w.category, SAWarning)]:
        raise FuluConfigError(f"{key}: {' '.join(str(ignored[0].message).split()).partition(' (Background')[0]}")


def check_tracking_uri(uri: object, key: str = "tracking.uri") -> None:
    """``key``: the option that gave ``uri``, as messages name it."""
    if not isinstance(uri, str) or "://" not in uri:
        raise FuluConfigError(f"{key}: expected http://host:port or sqlite:///path/mlflow.db, got {uri!r} "
                              "(MLflow 3 refuses plain folders: its file store is deprecated)")
    scheme = _scheme(uri)
    if scheme not in _TRACKING_SCHEMES:
        raise FuluConfigError(f"{key}: unsupported scheme {scheme!r} (use {', '.join(_TRACKING_SCHEMES)})")
    if not scheme.startswith("http"):
        _check_rdb_url(uri, key)


def check_output_dir(path: str, key: str = "hydra.run.dir") -> None:
    """FuluConfigError unless the folder ``path`` exists and is writable or can be made. Where it must
    be made, its missing folders are made and removed again: only trying tells, since root passes every
    permission check, a folder such as /proc refuses new entries whatever the permissions, and a name
    too long for the file system fails only where it is made. An empty path (an unset shell variable)
    is refused: it would put the study's databases in the current folder without a word."""
    if not str(path).strip():
        raise FuluConfigError(f"{key}: empty (an unset shell variable?): give a folder, or . for the current one")
    target = Path(path).absolute()
    # os.path.exists, unlike Path.exists, says False rather than raising where a folder cannot be read
    existing = next(p for p in (target, *target.parents) if os.path.exists(p))
    if not existing.is_dir():
        raise FuluConfigError(f"{key}: cannot make the folder {path!r}: {str(existing)!r} is a file, not a folder")
    if existing == target:
        problem = _file_cannot_be_made_in(target)
        if problem:
            raise FuluConfigError(f"{key}: cannot write in the folder {path!r} (making a file there failed: "
                                  f"{problem})")
        return
    made: list[Path] = []
    try:
        folder = existing
        for part in target.relative_to(existing).parts:
            folder = folder / part
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile (another worker of the study)
                continue
            made.append(folder)
    except OSError as e:
        raise FuluConfigError(f"{key}: cannot make the folder {path!r}: {e.strerror} ({str(folder)!r})") from None
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):  # not empty: another process has begun to use it
                folder.rmdir()


def _file_cannot_be_made_in(folder: Path) -> str | None:
    """Why no file can be made in ``folder`` (None when one can): a file made and removed at once,
    since only trying tells (os.access passes root, and a read-only mount or /proc refuses whatever
    the permissions)."""
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".fulu-nas-probe-"):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def _check_file_can_be_made(path: Path, key: str) -> None:
    """A database or journal file that does not exist yet is made by the command: its folder must take
    one (else the command failed at its first write, after Hydra had written the output folder, and a
    tracking database there hung in MLflow's retries with the study already created). A folder yet to be
    made is the output folder's (check_output_dir), or one check_storage_url refuses."""
    problem = _file_cannot_be_made_in(path.parent) if path.parent.is_dir() else None
    if problem:
        raise FuluConfigError(f"{key}: cannot make {path} (making a file in {str(path.parent)!r} failed: {problem})")


def _probe_sqlite_file(url: str, key: str) -> None:
    """An existing SQLite file must be a database (a damaged one, or a folder, failed only once the
    search had written its folder); one that does not exist yet must be one the command can make."""
    path = sqlite_file(url)
    if not path.exists():
        _check_file_can_be_made(path, key)
        return
    check_sqlite_database(path, key)


def check_sqlite_writable(url: str, key: str) -> None:
    """FuluConfigError unless the SQLite database of ``url`` (when it is one, and exists) can take a
    write: on a read-only file system or file a command that records into it failed only at its first
    write, after its work. Only trying tells (root passes every permission check): a write transaction
    is begun and rolled back. A database busy with another writer (a running search) passes."""
    import sqlite3

    if _scheme(url) != "sqlite" or not (path := sqlite_file(url)).is_file():
        return
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=5, isolation_level=None)) as db:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock, but writes nothing yet
            version = db.execute("PRAGMA user_version").fetchone()[0]
            db.execute(f"PRAGMA user_version = {int(version)}")  # a write of the header, undone below
            db.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            return
        raise FuluConfigError(f"{key}: cannot write to {path}: it is read-only ({e})") from None


def probe_storage(url: str) -> None:
    """Connect to a remote study storage; an existing SQLite file must be a database, an existing journal
    file a journal."""
    if _scheme(url) == "sqlite":
        _probe_sqlite_file(url, "study.storage")
        return
    if _scheme(url) == "journal":
        if journal_path(url).is_file():
            _check_journal_file(journal_path(url))
        else:
            _check_file_can_be_made(journal_path(url), "study.storage")
        return
    _probe_database(url, "study.storage")


def _check_journal_file(path: Path) -> None:
    """FuluConfigError unless every line of ``path`` is one of Optuna's journal records (a JSON object with
    an ``op_code``). Optuna skips a last line it cannot read (a write cut short) and appends after it, so
    a file of something else, a log of one line say, was taken as an empty journal and written into."""
    import json

    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not (isinstance(record, dict) and "op_code" in record):
                    raise FuluConfigError(f"study.storage: {str(path)!r} is not an Optuna journal file (line "
                                          f"{number} is no journal record)")
    except OSError as e:
        raise FuluConfigError(f"study.storage: cannot read the journal file {str(path)!r}: {e.strerror}") from None


def open_journal(url: str):
    """Optuna's journal storage of ``url`` (its file made where it does not exist); FuluConfigError for a
    file that cannot be read or is not a journal, where Optuna raises its reader's JSON or OS error."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    path = journal_path(url)
    try:
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as e:
        raise FuluConfigError(f"study.storage: cannot open the journal file {str(path)!r}: {e.strerror}") from None
    except ValueError as e:  # json.JSONDecodeError among them: a file of something else
        raise FuluConfigError(f"study.storage: {str(path)!r} is not an Optuna journal file ({e})") from None


def _same_database(a: str, b: str) -> bool:
    from sqlalchemy.engine import make_url

    if _scheme(a) == "sqlite" and _scheme(b) == "sqlite":
        return sqlite_file(a).resolve() == sqlite_file(b).resolve()
    try:
        x, y = make_url(a), make_url(b)
    except Exception:  # an http tracking server, a journal: never the same database as the other
        return False
    return (x.get_backend_name(), x.host, x.port, x.database) == (y.get_backend_name(), y.host, y.port, y.database)


def check_separate_databases(storage_url: str, tracking_uri: str) -> None:
    """FuluConfigError where the study's storage and the tracking store are one database, or either
    names the other's kind of database: Optuna and MLflow each make their tables in what they are given
    (MLflow's went into the user's optuna.db, then both failed on the other's schema version)."""
    if _same_database(storage_url, tracking_uri):
        raise FuluConfigError(f"study.storage and tracking.uri: both name the database {mask_url(storage_url)}; "
                              "Optuna and MLflow each need their own (a search's defaults: optuna.db and mlflow.db)")
    refuse_study_database(tracking_uri, "tracking.uri")
    tables = sqlite_tables(storage_url)
    if MLFLOW_TABLES <= tables and not OPTUNA_TABLES <= tables:
        raise FuluConfigError(f"study.storage: {mask_url(storage_url)} is an MLflow tracking database, not the "
                              "study's (a search keeps its study in optuna.db)")


def check_study_storage_exists(url: str, study_name: str) -> None:
    """FuluConfigError unless ``url`` holds a study storage already, for the commands that read one:
    Optuna opening a SQLite file creates its tables there (a wrong ``study.storage``, the MLflow
    database beside it say, gained Optuna's schema) and a journal URL creates its file."""
    hint = (f"(is {study_name!r} the study name? pass study.storage=... or hydra.run.dir=... if the search "
            f"used them)")
    if isinstance(url, str) and url.startswith("sqlite:///") and not sqlite_file(url).is_file():
        raise FuluConfigError(f"study.name: no study database at {sqlite_file(url)} {hint}")
    check_storage_url(url)
    if _scheme(url) == "journal" and not journal_path(url).is_file():
        raise FuluConfigError(f"study.storage: no journal file {str(journal_path(url))!r} {hint}")
    if _scheme(url) != "sqlite":
        probe_storage(url)
        return
    path = sqlite_file(url)
    _probe_sqlite_file(url, "study.storage")
    tables = sqlite_tables(url)
    if not OPTUNA_TABLES <= tables:
        what = "an MLflow tracking database" if MLFLOW_TABLES <= tables else "not an Optuna study database"
        raise FuluConfigError(f"study.storage: {path} is {what}, not the study's (a search keeps its study in "
                              f"optuna.db)")


def probe_tracking(uri: str, key: str = "tracking.uri") -> None:
    """Reach a tracking server or database; an existing SQLite file must be a database. ``key``: the option
    that gave ``uri``, as messages name it."""
    scheme = _scheme(uri)
    if scheme == "sqlite":
        _probe_sqlite_file(uri, key)
        return
    if scheme.startswith("http"):
        _probe_tracking_server(uri, key)
        return
    _probe_database(uri, key)


def _probe_tracking_server(uri: str, key: str) -> None:
    """Reach the MLflow server at ``uri`` as MLflow's client will: with the credentials it sends (an
    ``http://user:password@host`` URI's, MLFLOW_TRACKING_USERNAME and _PASSWORD, a token), where urllib
    took ``user:password@host`` for the host's name; once, not with the client's retries."""
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    shown = mask_url(uri)
    try:
        response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=10,
                                raise_on_status=False)
    except (MlflowException, requests.RequestException, ValueError) as e:
        problem = _first_cause(e)
        if (password := _url_password(uri)) is not None:
            problem = problem.replace(password, "***")
        raise FuluConfigError(f"{key}: cannot reach the MLflow server at {shown}: {problem}") from None
    if response.status_code in (401, 403):
        raise FuluConfigError(f"{key}: the MLflow server at {shown} refused the credentials (HTTP "
                              f"{response.status_code} {response.reason}): check the user and password in the URI, "
                              "or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
    if not response.ok:
        raise FuluConfigError(f"{key}: {shown} is not a healthy MLflow server (GET /health: HTTP "
                              f"{response.status_code} {response.reason})")


def _first_cause(e: BaseException) -> str:
    """What went wrong under MLflow's and requests' wrappers, which each repeat the URL and the pool's state
    around it: the socket's error (``[Errno 111] Connection refused``, a name not resolved) where there is
    one, else the outermost message (``Invalid url: ...``; deeper lies urllib3's parser's own failure)."""
    chain = [e]
    while (inner := chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(inner)
    return str(next((x for x in reversed(chain) if isinstance(x, OSError) and not isinstance(x, ValueError)), e))


def _url_password(uri: str) -> str | None:
    from urllib.parse import urlsplit

    try:
        return urlsplit(uri).password or None
    except ValueError:
        return None


def _probe_database(url: str, key: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 10} if "postgresql" in url else {})
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = database_error(e)
        raise FuluConfigError(f"{key}: cannot connect to {mask_url(url)}: {reason}") from None
    finally:
        engine.dispose()


def open_existing_storage(url: str):
    """The Optuna storage at ``url`` opened read-only, or None when it holds no study yet (a SQLite file or
    journal that does not exist, a database without Optuna's tables) or cannot be read here without a
    write (a SQLite file with a killed writer's journal to roll back): the search's own opening checks it."""
    import optuna
    import sqlalchemy
    from optuna.storages import RDBStorage

    scheme = _scheme(url)
    if scheme == "journal":
        # Reads the file; the backend makes it only where it does not exist
        return open_journal(url) if journal_path(url).is_file() else None
    given, engine_kwargs = url, {}
    if scheme == "sqlite":
        path = sqlite_file(url)
        if not path.is_file():
            return None
        # SQLite's read-only mode: nothing below can write to the file, whatever Optuna tries
        url, engine_kwargs = f"sqlite:///file:{path.resolve()}?mode=ro&uri=true", {"connect_args": {"timeout": 60}}
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
        try:
            if not {"studies", "version_info", "alembic_version"} <= set(sqlalchemy.inspect(engine).get_table_names()):
                return None  # the search makes Optuna's tables
        finally:
            engine.dispose()
        # skip_table_creation: the tables are there; with them Optuna's version check only reads
        return RDBStorage(url, engine_kwargs=engine_kwargs, skip_table_creation=True)
    except RuntimeError as e:  # tables of another Optuna version: the search would stop with a traceback
        raise FuluConfigError(f"study.storage: cannot open {mask_url(given)}: {str(e).strip()}") from None
    except (optuna.exceptions.OptunaError, sqlalchemy.exc.SQLAlchemyError):
        return None


def open_study_storage(url: str, heartbeat_interval: int | None = None, grace_period: int | None = None,
                       max_retry: int = 0, on_stale=None):
    """Optuna storage for ``url``: an RDB storage, with heartbeats when ``heartbeat_interval`` is
    given (a killed worker's trial is then failed and retried by the next worker, and
    ``on_stale(study, trial)`` runs on the failed trial), or a journal file (no heartbeats: the worker
    loop fails and retries the trials of this host's workers that are gone, see ``study.run_worker``)."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    if _scheme(url) == "journal":
        return open_journal(url)
    # SQLite serialises writers: wait for the lock instead of failing when workers share a file.
    engine_kwargs = {"connect_args": {"timeout": 60}} if _scheme(url) == "sqlite" else {"pool_pre_ping": True}
    heartbeat = {}
    if heartbeat_interval:
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

        def stale(study, trial) -> None:
            retry(study, trial)
            if on_stale is not None:
                on_stale(study, trial)

        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period,
                     "heartbeat_stale_trial_callback": stale}
    try:
        with warnings.catch_warnings():
            # Heartbeats and their retry callback are marked experimental; we rely on them knowingly.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = first_contact(url, lambda: RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat),
                                    _lost_creation_race)
    except Exception as e:
        _raise_cannot_open(url, e)
    if _scheme(url) == "sqlite":
        _begin_immediate(storage.engine)
    return storage


# Optuna and MLflow make their tables (and stamp or migrate their version) at a process's first contact with
# a database, checking first: processes doing so at once on a new database (the search's hosts started
# together, each with the same command) both find nothing and both create, and one fails on the other's
# rows. A SQLite file's first contacts are serialised (first_use_lock); a database server's are retried:
# once the winner is done, the tables are only read.
RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)


def database_error(e: Exception) -> str:
    """A database error's first line: the driver's own message, not SQLAlchemy's [SQL: ...] lines."""
    return str(getattr(e, "orig", None) or e).strip().splitlines()[0]


def first_contact(url: str, open_: Callable[[], T], lost_race: Callable[[Exception], bool]) -> T:
    """``open_()``, this process's first contact with the database of ``url``: under :func:`first_use_lock`,
    and again after a pause while it fails with an error ``lost_race`` takes for a collision."""
    for delay in (*RETRY_DELAYS, None):
        try:
            with first_use_lock(url):
                return open_()
        except Exception as e:
            if delay is None or not lost_race(e):
                raise
            time.sleep(delay)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def first_use_lock(url: str) -> Iterator[None]:
    """Held while this process makes, or first checks, the tables of the SQLite database of ``url`` (no-op
    for other URLs). Optuna and MLflow make their tables on first use, checking first, and processes doing
    so at once on one new file collide: one fails, and an MLflow migration cut short that way left a
    temporary table in the file on which every later opening failed. An exclusive ``flock`` on the file's
    folder serialises them (SQLite's own locks are ``fcntl`` record locks, which ``flock`` does not see;
    nothing is written for it)."""
    import fcntl

    folder = sqlite_file(url).parent if _scheme(url) == "sqlite" else None
    if folder is None or not folder.is_dir():
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # NFS emulates flock with record locks, which a folder opened read-only cannot take
            pass  # unserialised then, as before, with the retries
        yield
    finally:
        os.close(fd)  # and with it the lock


def _lost_creation_race(e: Exception) -> bool:
    import sqlalchemy

    return isinstance(e, sqlalchemy.exc.IntegrityError) or (
        isinstance(e, sqlalchemy.exc.DBAPIError) and "already exists" in str(getattr(e, "orig", e)))


def _raise_cannot_open(url: str, e: Exception):
    """One message for a connection or schema error from SQLAlchemy or alembic; anything else as it is."""
    import optuna

    if isinstance(e, optuna.exceptions.OptunaError) or "sqlalchemy" in type(e).__module__:
        reason = database_error(e)
        raise FuluConfigError(f"study.storage: cannot open {mask_url(url)}: {reason}") from None
    raise e


def _begin_immediate(engine) -> None:
    """Every transaction on ``engine`` takes SQLite's write lock when it begins (SQLAlchemy's recipe
    for pysqlite). pysqlite begins a transaction only at the first write, and SQLite ignores the
    ``SELECT ... FOR UPDATE`` with which Optuna takes a queued trial: two workers could both read the
    reference (or a killed worker's retried trial) as waiting, both mark it running and both train
    it, the second failing at the end ("Cannot tell a COMPLETE trial")."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_pysqlite_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners (the schema check) keep pysqlite's way
