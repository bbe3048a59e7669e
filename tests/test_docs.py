"""Every fenced code block of README.md, BENCHMARKS.md and docs/*.md is run here, or names the test that runs it.

A page's blocks run in order, in the page's own workspace: a temporary folder holding a copy of the
checkout's tracked files and the finished study of one tiny search (``outputs/tiny-clusters``, made
once for the module by ``fulu-nas search +experiment=tiny``, the README's own command). So a page
reads as a user at the root of a checkout would type it.

Blocks, by info string:

- ``bash``: one command a line (``\\`` continues a line); each must exit with 0.

  - ``fulu-nas ...`` runs in this process through the console script's own function
    (``fulu_nas.cli.main``), its arguments expanded by bash first, quotes and braces included. It
    is the code the script runs, without starting Python, torch and MLflow again for every line.
  - Shrinking, so that the whole file takes minutes: a ``fulu-nas search`` that trains (not
    ``--cfg``/``--help``) and sets no ``+experiment=`` gets ``+experiment=tiny study.n_trials=1``
    appended: the tiny task, space and budget and one trial, while the groups and keys the line
    sets itself still apply (command-line groups win over the experiment's). The default
    ``fulu-nas search`` thus runs as the tiny search. A search of ``task=upcycle`` gets that task's own
    preset instead (``+experiment=upcycle_tiny study.n_trials=1``). ``fulu-nas bench`` lines get tiny shapes and
    budgets appended (``BENCH_SHRINK``); ``-m fulu_nas.training.distributed`` lines likewise
    (``LINE_SHRINK``).
  - Servers (``fulu-nas ui``, ``fulu-nas serve``, ``optuna-dashboard``, ``mlflow models serve``,
    ``mlflow ui``/``server``)
    start in the background on 127.0.0.1 and a free port (put in place of the port the block names,
    in every line of the block), must answer HTTP, serve the rest of the block, and are stopped at
    its end.
  - ``pip ...`` runs in a virtual environment made for this module (``--system-site-packages``),
    never in the environment running the tests. A machine that cannot reach the package index
    skips the page.
  - Anything else runs in bash, with a timeout.

- ``python``: run in this process with ``exec`` (a fresh namespace per block), in the workspace,
  with a timeout.
- ``yaml``, ``text``, ``json``: examples and output, not run.

Everything runs on one torch thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``): what is
checked is that the commands work, not how fast, and on a shared 2-core machine one thread is
several times faster than two that wait for each other.

Markers, HTML comments on the lines just before a block:

- ``<!-- tested by: tests/test_x.py::test_y -->``: the block is not run here; each named test must
  exist (a function of that name in that file). ``<!-- tested by: .ci/run -->``: the block must be
  the last line of ``.ci/run`` (the CI's test command), byte for byte.
- ``<!-- needs CUDA -->``: without CUDA every command of the block must exit with code 2 and a
  message naming CUDA; with CUDA it must succeed.
- ``<!-- file: PATH -->``: the block is written to PATH in the workspace (and not run itself), for
  the commands after it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "BENCHMARKS.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
RUN = {"bash", "python"}
NOT_RUN = {"yaml", "text", "json"}
TIMEOUT_S = 300
SERVER_START_S = 120
FIXTURE_SEARCH = "fulu-nas search +experiment=tiny"
SEARCH_SHRINK = ["+experiment=tiny", "study.n_trials=1"]
# The tiny preset is another task's: an upcycling search takes its own.
UPCYCLE_SHRINK = ["+experiment=upcycle_tiny", "study.n_trials=1"]
# Appended to `fulu-nas bench <what> ...`: argparse keeps the last value of an option.
BENCH_SHRINK = {
    "layer": "--tokens 4 32 --hidden 32 --experts 4 --ffn 64 --min-run-time 0.01",
    "profile": "--tokens 64 --hidden 32 --experts 4 --ffn 64",
    "latency": "--tokens 16 --hidden 32 --experts 4 --ffn 64",
    "levels": "--hidden 32 --experts 4 --ffn 64 --tokens 32 --train-steps 2 --train-batch 8 --iterations 1 "
              "--warmup 1 --no-progress",
    "clusters": "--seconds 1",
    "routers": "--seconds 0.5",
    "dynamic": "--steps 20 --seeds 0",
}
# Appended to shell lines that contain the key.
LINE_SHRINK = {"-m fulu_nas.training.distributed": " --hidden 32 --ffn 64 --tokens 64 --steps 2"}
# Server commands (after any VAR=value prefix) and the port each listens on by default.
SERVERS = {("fulu-nas", "ui"): 5000, ("fulu-nas", "serve"): 5001, ("optuna-dashboard",): 8080,
           ("mlflow", "models", "serve"): 5000,
           ("mlflow", "ui"): 5000, ("mlflow", "server"): 5000}
# pip's words when the index cannot be reached (a machine offline): the page is skipped, not failed.
OFFLINE = ("Could not find a version that satisfies", "No matching distribution found", "NewConnectionError",
           "Temporary failure in name resolution")
MARKER = re.compile(r"<!--\s*(tested by|file|needs CUDA)\s*:?\s*(.*?)\s*-->")


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    tested_by: list[str] = field(default_factory=list)
    file: str | None = None
    needs_cuda: bool = False

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def parse(page: str) -> list[Block]:
    blocks, markers, current = [], [], None
    for number, line in enumerate((ROOT / page).read_text().splitlines(), start=1):
        if current is not None:
            if line.startswith("```"):
                blocks.append(current)
                current = None
            else:
                current.text += line + "\n"
            continue
        if line.startswith("```"):
            current = Block(page, number, line[3:].strip(), "")
            for key, value in markers:
                if key == "tested by":
                    current.tested_by += [v.strip() for v in value.split(",") if v.strip()]
                elif key == "file":
                    current.file = value
                else:
                    current.needs_cuda = True
            markers = []
        elif m := MARKER.fullmatch(line.strip()):
            markers.append((m.group(1), m.group(2)))
        elif line.strip():
            markers = []
    assert current is None, f"{page}: a code block opened at line {current.line} is never closed"
    return blocks


def commands(text: str) -> list[str]:
    """The block's command lines: continuations joined, blank lines and comment lines dropped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def missing_test(ref: str) -> str | None:
    """None if ``tests/x.py::name`` names a test function that exists, else what is wrong."""
    path, _, name = ref.partition("::")
    name = name.split("[")[0]
    file = ROOT / path
    if not (path.startswith("tests/") and file.is_file() and name):
        return f"{ref}: expected tests/<file>.py::<test function>"
    tree = ast.parse(file.read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return None if name in names else f"{ref}: no function {name} in {path}"


# -- the static checks: quick, no command runs ------------------------------------------------------

def test_every_block_is_run_here_or_names_an_existing_test():
    problems = []
    ci_last = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()][-1]
    for page in PAGES:
        for b in parse(page):
            if b.lang not in RUN | NOT_RUN:
                problems.append(f"{b.where}: info string {b.lang!r}; use one of {sorted(RUN | NOT_RUN)}")
            if b.tested_by and b.lang not in RUN:
                problems.append(f"{b.where}: a {b.lang} block is not a command; it needs no test")
            if b.file and (Path(b.file).is_absolute() or ".." in Path(b.file).parts):
                problems.append(f"{b.where}: file {b.file} must be a relative path inside the workspace")
            for ref in b.tested_by:
                if ref == ".ci/run":
                    if b.text.strip() != ci_last:
                        problems.append(f"{b.where}: expected the last line of .ci/run: {ci_last!r}")
                elif error := missing_test(ref):
                    problems.append(f"{b.where}: {error}")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_front_door_and_the_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    ci_last = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()][-1]
    assert f"```bash\n{ci_last}\n```" in readme
    problems = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        if re.search(r"\bsessions?\b", text, re.IGNORECASE):
            problems.append(f"{page}: says 'session'")
        prose = re.sub(r"`[^`\n]*`", "", text)  # `kernel[grid](...)` is code, not a link
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" not in target and not (ROOT / page).parent.joinpath(target).exists():
                problems.append(f"{page}: link to {target}, which does not exist")
    assert not problems, "\n".join(problems)


def test_the_module_paths_and_files_the_docs_name_exist():
    import importlib

    problems = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for path in set(re.findall(r"\bfulu_nas/[\w/.]*\w", text)):
            if not (ROOT / path).exists():
                problems.append(f"{page}: {path} does not exist")
        for dotted in set(re.findall(r"\bfulu_nas(?:\.\w+)+", text)):
            parts = dotted.split(".")
            for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                try:
                    for name in parts[i:]:
                        obj = getattr(obj, name)
                except AttributeError:
                    problems.append(f"{page}: {dotted} does not exist")
                break
    assert not problems, "\n".join(sorted(problems))


# -- running the pages ------------------------------------------------------------------------------

@contextlib.contextmanager
def time_limit(seconds: int, what: str):
    def expire(signum, frame):
        raise TimeoutError(f"{what}: still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fulu_nas_main(args: list[str], what: str) -> tuple[int, str]:
    """``fulu-nas ARGS`` in this process: (exit code, what it wrote to stderr)."""
    from fulu_nas.cli import main

    err = io.StringIO()
    with time_limit(TIMEOUT_S, what), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stderr.write(err.getvalue())
    return code, err.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, _one_torch_thread) -> Path:
    """The checkout's tracked files, and the finished study of the README's tiny search."""
    root = tmp_path_factory.mktemp("docs") / "checkout"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        source, target = ROOT / name, root / name
        if source.is_symlink() or source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target, follow_symlinks=False)
    cwd = os.getcwd()
    os.chdir(root)
    start = time.perf_counter()
    try:
        code, _ = fulu_nas_main(shlex.split(FIXTURE_SEARCH)[1:], FIXTURE_SEARCH)
    finally:
        os.chdir(cwd)
    print(f"[docs] {time.perf_counter() - start:6.1f} s  fixture: {FIXTURE_SEARCH}")
    assert code == 0, f"{FIXTURE_SEARCH} exited with {code}"
    return root


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A virtual environment for the pages' pip commands, seeing this interpreter's packages."""
    path = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(path)], check=True,
                   timeout=TIMEOUT_S)
    return path / "bin"


class Page:
    def __init__(self, page: str, workspace: Path, env: dict[str, str]):
        self.page, self.ws, self.env = page, workspace, env

    def run_block(self, b: Block) -> None:
        if b.lang == "python":
            code = compile(b.text, f"{self.ws / b.page}:{b.line}", "exec")
            start = time.perf_counter()
            with time_limit(TIMEOUT_S, b.where):
                exec(code, {"__name__": "docs_snippet"})
            print(f"[docs] {time.perf_counter() - start:6.1f} s  {b.where}: python block")
            return
        lines = commands(b.text)
        ports: dict[str, str] = {}
        for i, line in enumerate(lines):
            if (default := server_port(line)) is not None:
                lines[i] = line = shlex.join(shlex.split(line, comments=True))  # no comment to append to
                named = re.search(r"--port[ =](\d+)", line)
                if not named:
                    lines[i] = line = line + f" --port {default}"
                ports[named.group(1) if named else str(default)] = str(free_port())
        for old, new in ports.items():
            lines = [re.sub(rf"\b{old}\b", new, line) for line in lines]
        servers: list[tuple[subprocess.Popen, Path]] = []
        try:
            for line in lines:
                start = time.perf_counter()
                if server_port(line) is not None:
                    servers.append(self.start_server(b, line))
                else:
                    self.run_line(b, line)
                print(f"[docs] {time.perf_counter() - start:6.1f} s  {b.where}: {line}")
        finally:
            for proc, _ in servers:
                stop(proc)

    def run_line(self, b: Block, line: str) -> None:
        what = f"{b.where}: {line}"
        for key, extra in LINE_SHRINK.items():
            if key in line:
                line += extra
        if line.startswith("fulu-nas ") and not shell_operators(line):
            args = shrink(self.expand(line)[1:])
            code, err = fulu_nas_main(args, what)
        else:
            result = subprocess.run(["bash", "-c", line], cwd=self.ws, env=self.env, capture_output=True, text=True,
                                    timeout=TIMEOUT_S)
            code, err = result.returncode, result.stderr
            sys.stdout.write(result.stdout)
            sys.stderr.write(result.stderr)
            if code and line.startswith("pip ") and any(s in err for s in OFFLINE):
                pytest.skip(f"{what}: the package index cannot be reached from here")
        if b.needs_cuda and not cuda_available():
            assert code == 2 and "CUDA" in err, f"{what}: expected exit code 2 naming CUDA, got {code}: {err[-2000:]}"
        else:
            assert code == 0, f"{what}: exit code {code}\n{err[-3000:]}"

    def expand(self, line: str) -> list[str]:
        """The words bash makes of ``line`` (quotes, braces, variables, comments)."""
        result = subprocess.run(["bash", "-c", "printf '%s\\0' " + line], cwd=self.ws, env=self.env,
                                capture_output=True, text=True, check=True)
        return result.stdout.split("\0")[:-1]

    def start_server(self, b: Block, line: str) -> tuple[subprocess.Popen, Path]:
        if "--host" not in line:
            line += " --host 127.0.0.1"
        port = int(re.search(r"--port[ =](\d+)", line).group(1))
        log = self.ws / f"server-{port}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", line], cwd=self.ws, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + SERVER_START_S
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
                return proc, log
            except urllib.error.HTTPError:  # it answers
                return proc, log
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                stop(proc)
                pytest.fail(f"{b.where}: {line}: the server did not answer on port {port}\n{log.read_text()[-3000:]}")
            time.sleep(0.5)


def server_port(line: str) -> int | None:
    words = [w for w in shlex.split(line, comments=True) if not re.fullmatch(r"[A-Za-z_]\w*=.*", w)]
    for prefix, port in SERVERS.items():
        if tuple(words[:len(prefix)]) == prefix:
            return port
    return None


def shell_operators(line: str) -> bool:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.commenters = "#"
    return any(set(token) <= set("|&;<>()") for token in lexer)


def shrink(args: list[str]) -> list[str]:
    if args[:1] == ["search"] and not any(a.startswith("+experiment=") or a in ("--cfg", "--help", "-h", "--info")
                                          for a in args):
        return args + (UPCYCLE_SHRINK if "task=upcycle" in args else SEARCH_SHRINK)
    if args[:1] == ["bench"] and len(args) > 1 and args[1] in BENCH_SHRINK:
        return args + BENCH_SHRINK[args[1]].split()
    return args


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_runs(page, request, tmp_path, monkeypatch):
    blocks = parse(page)
    runnable = [b for b in blocks if b.lang in RUN and not b.tested_by and not b.file]
    if not runnable:
        pytest.skip(f"{page} has no command to run")
    workspace = tmp_path / "work"
    shutil.copytree(request.getfixturevalue("checkout"), workspace, symlinks=True)
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    if any(line.startswith("pip ") for b in runnable if b.lang == "bash" for line in commands(b.text)):
        path.insert(0, str(request.getfixturevalue("venv")))
    env = {**os.environ, "PATH": os.pathsep.join(path), "PET_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    monkeypatch.chdir(workspace)
    runner = Page(page, workspace, env)
    to_run = {id(b) for b in runnable}
    for b in blocks:
        if b.file:
            target = workspace / b.file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(b.text)
        elif id(b) in to_run:
            runner.run_block(b)
