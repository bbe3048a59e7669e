"""Where a study and its runs are kept: the study's storage and the tracking store must be two
databases of their own kinds, a journal URL must name a journal file, and an output folder must be
one the file system can make. Each refused with exit code 2, one message, nothing written or changed."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError

from . import postgres
from .test_search_e2e import run_search

FAST = ("study.n_trials=1", "trainer.steps=5", "trainer.report_every=5", "study.pruner=none")


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """The folder of a finished tiny search: its optuna.db and mlflow.db."""
    root = tmp_path_factory.mktemp("searched")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert run_search(root / "out", *FAST) == 0
    finally:
        os.chdir(cwd)
    return root / "out"


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _refused(capsys, argv: list[str], words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err, err
    assert "Traceback" not in err, err
    return err


@pytest.mark.parametrize("kind", ["optuna.db as tracking", "mlflow.db as storage", "one file for both"])
def test_the_study_and_its_runs_need_two_databases_of_their_own_kinds(kind, searched, tmp_path, monkeypatch,
                                                                      capsys):
    """MLflow made its tables in the user's optuna.db (then failed on Optuna's schema version, exit 1 and
    a traceback, the output folder half-written); an mlflow.db as the study's storage was Optuna's
    RuntimeError; one new file for both was MLflow's migration error."""
    optuna_db, mlflow_db = searched / "optuna.db", searched / "mlflow.db"
    overrides, words = {
        "optuna.db as tracking": ([f"tracking.uri=sqlite:///{optuna_db}"],
                                  "tracking.uri: sqlite:///" + str(optuna_db) + " is an Optuna study database"),
        "mlflow.db as storage": ([f"study.storage=sqlite:///{mlflow_db}"],
                                 "study.storage: sqlite:///" + str(mlflow_db) + " is an MLflow tracking database"),
        "one file for both": ([f"study.storage=sqlite:///{tmp_path / 'both.db'}",
                               f"tracking.uri=sqlite:///{tmp_path / 'both.db'}"],
                              "study.storage and tracking.uri: both name the database"),
    }[kind]
    before = _digests(searched)
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["search", "+experiment=tiny", f"hydra.run.dir={tmp_path / 'new'}", *overrides], words)
    assert _digests(searched) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_sqlite_url_with_a_query_names_the_same_file_everywhere(searched, tmp_path, monkeypatch, capsys):
    """SQLAlchemy passes a URL's query to the driver (``?timeout=30``) and the search ran with it, but
    every check of the file took ``study.db?timeout=30`` as its name: confirm and export found no study,
    a refused resume rewrote the folder's .hydra/ first, and an MLflow database as the storage was not
    refused (Optuna made its tables in it, then a traceback)."""
    query = "?timeout=30"
    storage = f"study.storage='sqlite:///{searched / 'optuna.db'}{query}'"  # quoted: Hydra's grammar
    monkeypatch.chdir(tmp_path)
    assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={searched}", storage,
                 f"out={tmp_path / 'model'}", "name=tiny-query"]) == 0, capsys.readouterr().err
    assert (tmp_path / "model" / "model.safetensors").is_file()
    hydra = {p.name: p.read_bytes() for p in (searched / ".hydra").iterdir()}
    before = _digests(searched)
    _refused(capsys, ["search", "+experiment=tiny", f"hydra.run.dir={searched}", *FAST[:1], "trainer.steps=6",
                      "trainer.report_every=5", "study.pruner=none", storage], "created with another")
    assert {p.name: p.read_bytes() for p in (searched / ".hydra").iterdir()} == hydra
    mlflow_db = searched / "mlflow.db"
    _refused(capsys, ["search", "+experiment=tiny", f"hydra.run.dir={tmp_path / 'new'}",
                      f"study.storage='sqlite:///{mlflow_db}{query}'"],
             f"study.storage: sqlite:///{mlflow_db}{query} is an MLflow tracking database")
    assert _digests(searched) == before
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("command", ["confirm", "export"])
def test_a_command_reading_a_study_refuses_its_optuna_db_as_tracking_store(command, searched, tmp_path,
                                                                            monkeypatch, capsys):
    """confirm and export record runs: the study's optuna.db given as tracking.uri would have gained MLflow's
    tables."""
    before = _digests(searched)
    monkeypatch.chdir(tmp_path)
    _refused(capsys, [command, "study.name=tiny-clusters", f"hydra.run.dir={searched}",
                      f"tracking.uri=sqlite:///{searched / 'optuna.db'}"], "both name the database")
    assert _digests(searched) == before


@pytest.mark.parametrize("url,words", [
    ("journal:///{tmp}", "names a folder, not a journal file"),
    ("journal:", "names a folder, not a journal file"),
    ("journal:///{tmp}/notes.log", "is not an Optuna journal file (line 1 is no journal record)"),
])
def test_a_journal_url_names_a_journal_file(url, words, tmp_path, monkeypatch, capsys):
    """A folder (or no path) was an IsADirectoryError traceback after Hydra wrote .hydra/ and search.log; a
    file of something else Optuna's JSONDecodeError."""
    (tmp_path / "notes.log").write_text("not a journal\n")
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["search", "+experiment=tiny", f"hydra.run.dir={tmp_path / 'out'}",
                      "study.storage=" + url.format(tmp=tmp_path)], words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.log"]
    assert (tmp_path / "notes.log").read_text() == "not a journal\n"


def test_confirm_refuses_a_file_that_is_no_journal(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.log").write_text("not a journal\n")
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["confirm", "study.name=tiny-clusters", f"hydra.run.dir={tmp_path}",
                      f"study.storage=journal:///{tmp_path}/notes.log"], "is not an Optuna journal file")
    assert (tmp_path / "notes.log").read_text() == "not a journal\n"


@pytest.mark.parametrize("where", ["hydra.run.dir", "study.name"])
def test_an_output_folder_whose_name_is_too_long_is_refused_before_anything_is_made(where, tmp_path, monkeypatch,
                                                                                     capsys):
    """Only the first missing folder was tried: a name too long deeper down was Hydra's traceback, and
    the folders above it were left behind."""
    long = "n" * 300
    monkeypatch.chdir(tmp_path)
    override = f"hydra.run.dir={tmp_path}/a/b/{long}" if where == "hydra.run.dir" else f"study.name={long}"
    _refused(capsys, ["search", "+experiment=tiny", override], "File name too long")
    assert list(tmp_path.iterdir()) == []


# -- the composition's own errors, as one line naming the key or the file ------------------------------------
@pytest.mark.parametrize("command,override,words", [
    ("search", "task=nosuch", "task: no option 'nosuch' (options: clusters, pimoe_mix, textlm, upcycle)"),
    ("search", "search_space=nosuch", "search_space: no option 'nosuch' (options: default, gpu, nasbench,"),
    ("confirm", "trainer=nosuch", "trainer: no option 'nosuch' (options: default, gpu, tiny)"),
])
def test_an_unknown_group_option_is_named_with_the_groups_options(command, override, words, tmp_path, monkeypatch,
                                                                   capsys):
    """Hydra's text: the options between tabs, then its config search path."""
    monkeypatch.chdir(tmp_path)
    argv = [command, *(["study.name=x"] if command == "confirm" else []), override]
    assert "search path" not in _refused(capsys, argv, words)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("top, kind", [("- num_experts\n- top_k\n", "list"), ("42\n", "int"), ("true\n", "bool")])
def test_a_config_file_that_is_not_a_mapping_is_named(top, kind, tmp_path, monkeypatch, capsys):
    """OmegaConf's error named only the key it failed to resolve (``hydra.run.dir``), not the file; a number
    or a boolean at the top was OmegaConf's OSError, a traceback (exit 1)."""
    space = tmp_path / "conf" / "search_space" / "mine.yaml"
    space.parent.mkdir(parents=True)
    space.write_text(top)
    monkeypatch.chdir(tmp_path)
    _refused(capsys, ["search", "--config-dir", str(tmp_path / "conf"), "search_space=mine"],
             f"{space}: a config file must map keys to values (its top level is a {kind})")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]


@pytest.mark.parametrize("command", ["export", "confirm", "dashboard"])
@pytest.mark.parametrize("text, words", [("params: {num_experts: {type: int, low: 1, high: 4}\n  top_k: [\n",
                                          "malformed YAML"),
                                         ("42\n", "a config file must map keys to values (its top level is a int)")])
def test_a_study_command_names_a_config_file_it_cannot_read(command, text, words, searched, tmp_path, monkeypatch,
                                                            capsys):
    """The commands that read a study take the search's --config-dir: a space file there that is not YAML,
    or not a mapping, ended them with the parser's traceback (exit 1); the search named it (exit 2)."""
    space = tmp_path / "conf" / "search_space" / "mine.yaml"
    space.parent.mkdir(parents=True)
    space.write_text(text)
    monkeypatch.chdir(tmp_path)
    before = _digests(searched)
    err = _refused(capsys, [command, "study.name=tiny-clusters", f"hydra.run.dir={searched}", "--config-dir",
                            str(tmp_path / "conf"), "search_space=mine"], words)
    assert str(space) in err, err
    assert _digests(searched) == before


def test_a_storage_another_process_makes_in_the_same_instant_is_opened(tmp_path):
    """Hosts started at once on an empty database each make Optuna's tables: both found no schema version
    and both stamped it, and the second stopped with "cannot open ...: UNIQUE constraint failed:
    alembic_version.version_num" (exit 2). Here the other process stamps just before this one's stamp
    is written, the moment of the race."""
    import optuna
    import sqlalchemy
    from optuna.storages._rdb.storage import _VersionManager

    from fulu_nas.search.storage import open_study_storage

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    raced: list[str] = []

    def before_execute(conn, cursor, statement: str, *args) -> None:
        if statement.startswith("INSERT INTO alembic_version") and not raced:
            raced.append(statement)
            other = sqlalchemy.create_engine(url)  # the other process: its tables are there, it stamps
            _VersionManager(url, other, sqlalchemy.orm.scoped_session(sqlalchemy.orm.sessionmaker(bind=other)))
            other.dispose()

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", before_execute)
    try:
        storage = open_study_storage(url, heartbeat_interval=1, grace_period=2)
    finally:
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", before_execute)
    assert raced
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2


def _open_together(runs: list[tuple[str, str]], folder: Path) -> list[tuple[int, str, str]]:
    """Each ``(code, url)`` run in its own process with the URL as ``sys.argv[1]``: every process imports
    what it needs, says it is ready, and waits for the others; then all go at once (a race at process start
    was otherwise a matter of the machine's load). Their exit codes, outputs and errors."""
    import subprocess
    import sys
    import time

    ready = ("import pathlib, sys, time; here = pathlib.Path(sys.argv[2]); (here / sys.argv[3]).touch()\n"
             "def go():\n    while not (here / 'go').exists(): time.sleep(0.001)\n")
    procs = [subprocess.Popen([sys.executable, "-c", ready + code, url, str(folder), f"ready-{i}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, (code, url) in enumerate(runs)]
    deadline = time.monotonic() + 300
    while len(list(folder.glob("ready-*"))) < len(runs) and time.monotonic() < deadline \
            and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    (folder / "go").touch()
    return [(p.returncode, out, err) for p in procs for out, err in [p.communicate(timeout=300)]]


MLFLOW_OPENS = ("from fulu_nas.search.tracking import open_experiment, quiet_mlflow; quiet_mlflow(); "
                "import mlflow.store.tracking.sqlalchemy_store; go(); "
                "print(open_experiment(sys.argv[1], 'e', None)[1])")
OPTUNA_OPENS = ("from fulu_nas.search.storage import open_study_storage; import optuna.storages; go(); "
                "open_study_storage(sys.argv[1])")


def test_searches_starting_at_once_on_a_new_tracking_database_share_its_experiment(tmp_path):
    """Two processes making MLflow's tables in one new SQLite file at once collided (a column added twice,
    an alembic version row already moved, a migration's temporary table left in the file) and one or
    both stopped with a traceback. Three pairs, each on a file of its own."""
    results = _open_together([(MLFLOW_OPENS, f"sqlite:///{tmp_path / f'mlflow-{i}.db'}") for i in range(3)
                              for _ in range(2)], tmp_path)
    assert [code for code, _, _ in results] == [0] * 6, [err[-2000:] for _, _, err in results]
    for i in range(3):
        assert results[2 * i][1] == results[2 * i + 1][1] != ""  # one experiment, found by both


def test_a_folder_that_cannot_be_locked_still_opens_its_databases(tmp_path, monkeypatch):
    """On NFS, flock is emulated by record locks, which a folder opened read-only cannot take (EBADF): the
    first contact goes on unserialised rather than stopping the search."""
    import errno
    import fcntl

    import optuna

    from fulu_nas.search.storage import open_study_storage
    from fulu_nas.search.tracking import open_experiment

    def flock(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", flock)
    storage = open_study_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="s", storage=storage)
    client, experiment_id = open_experiment(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", None)
    assert client.get_experiment(experiment_id).name == "e"


@pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed")
def test_hosts_starting_at_once_on_new_postgresql_databases_all_open_them(tmp_path):
    """`fulu-nas search` started on every host at once, as docs/search.md says to, on two new databases:
    Optuna's and MLflow's table creations collided ('duplicate key value violates unique constraint
    "pg_type_typname_nsp_index"', 'relation "studies" already exists') and a host stopped."""
    with postgres.postgres_server(("optuna", "mlflow")) as urls:
        results = _open_together([(MLFLOW_OPENS, urls["mlflow"])] * 3 + [(OPTUNA_OPENS, urls["optuna"])] * 3,
                                 tmp_path)
    assert [code for code, _, _ in results] == [0] * 6, [err[-1500:] for code, _, err in results if code]


@pytest.mark.parametrize("command", ["dashboard", "export", "confirm"])
def test_a_study_read_from_outside_its_folder_with_another_searchs_runs_is_refused(command, searched, tmp_path,
                                                                                   monkeypatch, capsys):
    """From outside the search's folder the study's settings come from its MLflow parent run: a tracking
    database without that run (another search's) was MLflow's "Run ... not found" traceback, exit 1."""
    monkeypatch.chdir(tmp_path)
    assert run_search(tmp_path / "other", *FAST) == 0
    capsys.readouterr()
    elsewhere = tmp_path / "elsewhere"
    argv = [command, "study.name=tiny-clusters", f"study.storage=sqlite:///{searched / 'optuna.db'}",
            f"tracking.uri=sqlite:///{tmp_path / 'other' / 'mlflow.db'}", f"hydra.run.dir={elsewhere}"]
    before = _digests(searched)
    err = _refused(capsys, argv + ([f"out={tmp_path / 'x'}"] if command == "export" else []),
                   f"tracking.uri: sqlite:///{tmp_path / 'other' / 'mlflow.db'} has no search_config.json of run")
    assert len(err.strip().splitlines()) <= 2 and _digests(searched) == before and not elsewhere.exists()


@pytest.mark.skipif(not postgres.available(), reason="PostgreSQL is not installed")
def test_a_tracking_database_without_mlflow_tables_is_refused_and_left_empty(searched, tmp_path, monkeypatch,
                                                                              capsys):
    """An empty PostgreSQL database given as tracking.uri (a misspelt name that exists, another team's):
    MLflow's client made its tables there, then failed with a traceback."""
    from sqlalchemy import create_engine, inspect

    monkeypatch.chdir(tmp_path)
    with postgres.postgres_server(("empty",)) as urls:
        argv = ["dashboard", "study.name=tiny-clusters", f"study.storage=sqlite:///{searched / 'optuna.db'}",
                f"tracking.uri={urls['empty']}", f"hydra.run.dir={tmp_path / 'elsewhere'}"]
        _refused(capsys, argv, "holds no MLflow runs (no MLflow tables)")
        engine = create_engine(urls["empty"])
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()


@contextlib.contextmanager
def _server_asking_for(user: str, password: str):
    """An HTTP server on 127.0.0.1 answering /health as an MLflow server behind basic authentication does:
    200 with the credentials, 401 without them."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            ok = self.headers.get("Authorization") == expected
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(b"OK" if ok else b"Unauthorized")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_tracking_server_url_with_its_credentials_is_reached_with_them():
    """``http://user:password@host:port``: the check read ``user:password@host`` as the host name and
    refused the server as a name it could not resolve, before MLflow (which sends the credentials) was
    asked; wrong credentials are named as such."""
    from fulu_nas.errors import FuluConfigError
    from fulu_nas.search.storage import probe_tracking

    with _server_asking_for("alice", "pw") as port:
        probe_tracking(f"http://alice:pw@127.0.0.1:{port}")
        with pytest.raises(FuluConfigError) as refused:
            probe_tracking(f"http://alice:wrong@127.0.0.1:{port}")
    message = str(refused.value)
    assert message.startswith("tracking.uri: ") and "401" in message and "wrong" not in message, message


def test_a_tracking_server_is_reached_with_mlflows_credentials_from_the_environment(monkeypatch):
    """MLflow's documented way to a server behind authentication: MLFLOW_TRACKING_USERNAME and _PASSWORD,
    the URI without them; the check must send what MLflow's client sends."""
    from fulu_nas.errors import FuluConfigError
    from fulu_nas.search.storage import probe_tracking

    with _server_asking_for("bob", "pw2") as port:
        with pytest.raises(FuluConfigError, match="refused the credentials"):
            probe_tracking(f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw2")
        probe_tracking(f"http://127.0.0.1:{port}")


@pytest.mark.parametrize("command", [["search", "+experiment=tiny", "study.storage=postgresql://u:pw@h:abc/db"],
                                     ["search", "+experiment=tiny", "tracking.uri=postgresql://u:pw@h:abc/db"],
                                     ["ui", "--tracking-uri", "postgresql://u:pw@h:abc/db"]])
def test_a_database_url_whose_port_is_not_a_number_is_one_message(command, tmp_path, monkeypatch, capsys):
    """SQLAlchemy reads the port with int(): a ValueError traceback, exit 1, where a malformed URL is a
    message naming the key, exit 2."""
    monkeypatch.chdir(tmp_path)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert "malformed URL" in err and "its port is not a number" in err and "Traceback" not in err, err
    assert "pw" not in err.replace("postgresql://u:***", "") and list(tmp_path.iterdir()) == []


def _crash_mid_write(db: Path) -> None:
    """A process that dies inside a write transaction of ``db`` (as a search killed while MLflow or Optuna
    wrote), leaving the rollback journal SQLite rolls back at the next writer's opening."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", (
        "import os, sqlite3\n"
        f"db = sqlite3.connect({str(db)!r}, isolation_level=None)\n"
        "db.execute('PRAGMA cache_size=1')\n"  # the write spills to the file before the transaction ends
        "db.execute('BEGIN')\n"
        "db.execute('CREATE TABLE filler AS SELECT zeroblob(4096) AS b FROM (SELECT 1 UNION ALL SELECT 2) "
        "JOIN (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200) SELECT i FROM n)')\n"
        "os._exit(0)\n")], check=True)
    assert db.with_name(db.name + "-journal").is_file()


@pytest.mark.parametrize("database", ["mlflow.db", "optuna.db"])
def test_a_search_killed_while_writing_a_database_resumes(database, searched, tmp_path, monkeypatch, capsys):
    """A search killed inside a write of its mlflow.db left the file's rollback journal; the resume's check,
    which opens the file read-only, could not read it without rolling the journal back and refused it as
    "not a SQLite database (attempt to write a readonly database)" (exit 2): the study could not go on."""
    import shutil

    import optuna

    out = tmp_path / "out"
    shutil.copytree(searched, out)
    _crash_mid_write(out / database)
    monkeypatch.chdir(tmp_path)
    assert run_search(out, *FAST[1:], "study.n_trials=2") == 0, capsys.readouterr().err
    study = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{out / 'optuna.db'}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2
    assert not (out / f"{database}-journal").exists()  # rolled back by the resume's first writer


def test_a_journal_that_cannot_be_rolled_back_is_named(tmp_path, monkeypatch):
    """Where the roll-back cannot write (a read-only mount, another user's folder), the check said the file
    was "not a SQLite database": it names the cut-off write's journal and what rolls it back."""
    import fulu_nas.checks as checks

    db = tmp_path / "optuna.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.commit()
    _crash_mid_write(db)
    monkeypatch.setattr(checks, "roll_back_crashed_write", lambda path: None)  # as where it may not write
    with pytest.raises(FuluConfigError, match=r"study.storage: .*optuna.db has the rollback journal of a write that "
                                              r"was cut off \(.*optuna.db-journal\), which only a process that may "
                                              r"write .* can roll back"):
        checks.check_sqlite_database(db, "study.storage")
