"""Export: the directory, torch-only loading of model.pt2, MLflow serving and the registry,
checksums, and trial selection."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pytest
import torch
import yaml

import fulu_nas
from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError
from fulu_nas.search.export_trial import select_trial

from .helpers import flip_last_byte, free_port
from .test_search_e2e import load_study, run_search

TrialState = optuna.trial.TrialState


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny study and its best trial exported (shared by the tests of this module)."""
    root = tmp_path_factory.mktemp("export")
    out = root / "out"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert run_search(out, "study.n_trials=3", "study.pruner=none") == 0
        assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={root / 'model'}"]) == 0
    finally:
        os.chdir(cwd)
    return SimpleNamespace(root=root, out=out, model_dir=root / "model", study=load_study(out))


def tokens(batch=3, seq=12, vocab=40, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_export_directory_and_load(exported):
    d = exported.model_dir
    for name in ("config.yaml", "model.safetensors", "model.pt2", "MLmodel", "metrics.json", "README.md",
                 "checksums.json", "requirements.txt", "python_env.yaml"):
        assert (d / name).is_file(), name
    study = exported.study
    best = min((t for t in study.trials if t.state == TrialState.COMPLETE), key=lambda t: t.values[0])
    metrics = json.loads((d / "metrics.json").read_text())
    # Measured again on the exported weights: the same validation loss the trial reported.
    assert metrics["loss"] == pytest.approx(best.user_attrs["metrics"]["loss"], rel=1e-4)
    assert {"accuracy", "routing_accuracy", "load_balance", "latency_ms", "active_params"} <= metrics.keys()
    model = fulu_nas.load(d)
    assert isinstance(model, torch.nn.Module) and not model.training
    assert model.arch.to_dict() == best.user_attrs["arch"]
    card = (d / "README.md").read_text()
    assert f"trial {best.number}" in card and "fulu-nas serve" in card


def run_card_snippet(model_dir: Path) -> dict:
    """The names the card's torch-only lines define, run in the export folder."""
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(model_dir)
    try:
        exec(card_snippet(model_dir), namespace)
    finally:
        os.chdir(cwd)
    return namespace


def card_snippet(model_dir: Path) -> str:
    """The model card's lines that load model.pt2 with torch alone."""
    card = (model_dir / "README.md").read_text()
    section = card[card.index("## Loading model.pt2 with torch alone"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start:section.index("```", start)]


@pytest.mark.slow
def test_program_runs_with_torch_alone_and_matches(exported, tmp_path):
    """The model card's torch-only lines load the program (checking its SHA-256 first) without fulu_nas,
    and refuse a changed file."""
    model = fulu_nas.load(exported.model_dir)
    x = tokens(vocab=model.arch.vocab_size)
    np.save(tmp_path / "x.npy", x.numpy())
    script = textwrap.dedent(f"""
        import sys
        sys.modules["fulu_nas"] = None          # make any import of fulu_nas fail
        import numpy as np, torch
        namespace = {{}}
        exec(sys.stdin.read(), namespace)
        program = namespace["program"]
        x = torch.from_numpy(np.load({str(tmp_path / "x.npy")!r}))
        with torch.no_grad():
            np.save({str(tmp_path / "y.npy")!r}, program.module()(x).numpy())
            # dynamic batch and sequence
            assert program.module()(x[:1, :5]).shape[:2] == (1, 5)
        try:
            import fulu_nas  # noqa
        except ImportError:
            print("fulu_nas not importable")
    """)
    snippet = card_snippet(exported.model_dir)
    result = subprocess.run([sys.executable, "-c", script], input=snippet, capture_output=True, text=True,
                            cwd=exported.model_dir)
    assert result.returncode == 0, result.stderr
    assert "fulu_nas not importable" in result.stdout
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "y.npy")), expected, rtol=1e-5, atol=1e-5)

    copy = tmp_path / "copy"
    shutil.copytree(exported.model_dir, copy)
    flip_byte(copy / "model.pt2")
    result = subprocess.run([sys.executable, "-c", script], input=snippet, capture_output=True, text=True, cwd=copy)
    assert result.returncode != 0 and "model.pt2 is not the exported file" in result.stderr


@pytest.mark.slow
def test_the_program_takes_batches_up_to_the_documented_bound(exported):
    """The docs said 'any batch'; the program has a bound (a dynamic dimension needs one): they say it now."""
    from fulu_nas.deploy.export import MAX_BATCH
    from fulu_nas.deploy.pt2_check import load_program

    folder = exported.model_dir
    program = load_program(folder / "model.pt2", json.loads((folder / "checksums.json").read_text())["model.pt2"])
    with torch.no_grad():
        assert program.module()(torch.zeros(MAX_BATCH, 1, dtype=torch.long)).shape[0] == MAX_BATCH
        with pytest.raises(Exception, match="Guard failed"):
            program.module()(torch.zeros(MAX_BATCH + 1, 1, dtype=torch.long))
    docs = (Path(__file__).parents[1] / "docs" / "export.md").read_text()
    card = (folder / "README.md").read_text()
    for text in (docs, card):
        assert f"up to {MAX_BATCH}" in text and "any batch" not in text
    assert "dynamic batch and sequence" not in docs


@pytest.mark.slow
def test_load_program_takes_the_hash_as_the_other_loader_does_and_tells_a_wrong_hash_from_a_changed_file(exported):
    """The documented Python loader of model.pt2 said "the file was modified after export" of a good file given
    its hash in upper case, with a newline (read from a file), as None, or as the folder's fingerprint (the
    hash `fulu-nas export` prints), where `fulu_nas.load` takes the first two and names the others."""
    from fulu_nas.deploy.export import fingerprint
    from fulu_nas.deploy.pt2_check import UnsafeProgramError, load_program

    folder = exported.model_dir
    digest = json.loads((folder / "checksums.json").read_text())["model.pt2"]
    for given in (digest.upper(), digest + "\n", f"  {digest} "):
        assert isinstance(load_program(folder / "model.pt2", given), torch.export.ExportedProgram)
    for given in (None, 12, "sha256:" + digest, digest[:40]):
        with pytest.raises(ValueError, match="expected_sha256: .* is not a SHA-256"):
            load_program(folder / "model.pt2", given)
    with pytest.raises(UnsafeProgramError) as wrong:
        load_program(folder / "model.pt2", fingerprint(folder))
    message = str(wrong.value)
    assert f"SHA-256 is {digest}" in message and "model.pt2's entry in checksums.json" in message, message


@contextlib.contextmanager
def serving(model: Path | str, *options: str, tracking_uri: str | None = None):
    """``fulu-nas serve`` of ``model`` (a folder or a registered model URI) on a free port; yields
    ``post(payload) -> (status, json)``."""
    port = free_port()
    env = {**os.environ, **({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})}
    server = subprocess.Popen([sys.executable, "-m", "fulu_nas", "serve", str(model), *options, "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)

    def post(payload):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:  # an answer, with an error status
            return e.code, json.loads(e.read())

    try:
        deadline = time.time() + 120
        while True:
            assert server.poll() is None, "fulu-nas serve exited"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=10).close()
                break
            except OSError:
                assert time.time() < deadline, "the server did not answer"
                time.sleep(1)
        yield post
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.slow
def test_mlflow_serves_the_model_and_the_registry_resolves_champion(exported):
    import mlflow

    model = fulu_nas.load(exported.model_dir)
    x = tokens(vocab=model.arch.vocab_size)
    with torch.no_grad():
        expected = model(x).logits.numpy()

    from fulu_nas.deploy.export import fingerprint
    from fulu_nas.deploy.serve import load_pyfunc

    tracking = f"sqlite:///{exported.out / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking)
    registered = mlflow.pyfunc.load_model("models:/tiny-clusters@champion")
    np.testing.assert_allclose(registered.predict(x.numpy()), expected, rtol=1e-5, atol=1e-5)
    checked = load_pyfunc("models:/tiny-clusters@champion", tracking_uri=tracking)
    np.testing.assert_allclose(checked.predict(x.numpy()), expected, rtol=1e-5, atol=1e-5)

    for source, options in (("models:/tiny-clusters@champion", ()),
                            (exported.model_dir, ("--sha256", fingerprint(exported.model_dir)))):
        with serving(source, *options, tracking_uri=tracking) as post:
            status, answer = post({"inputs": x.tolist()})
        assert status == 200, source
        np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, rtol=1e-5, atol=1e-5)


def bad_inputs(vocab: int, max_seq_len: int) -> list[tuple[np.ndarray, str]]:
    """Inputs the model cannot take, each with words its error message must contain."""
    return [(np.array([[1.5, 2.0]]), "dtype"),
            (np.array([[True, False]]), "bool"),
            (np.array([[1.5, 2]], dtype=object), "got 1.5 (float)"),  # JSON values as the scoring server passes them
            (np.zeros((1, 2, 3), dtype=np.int64), "shape"),
            (np.array([[0, vocab]], dtype=np.int64), f"0..{vocab - 1}"),
            (np.array([[-1, 0]], dtype=np.int64), f"0..{vocab - 1}"),
            (np.zeros((1, max_seq_len + 1), dtype=np.int64), f"at most {max_seq_len}")]


@pytest.mark.slow
def test_the_champion_is_the_signed_model_of_the_folder_and_both_refuse_bad_input(exported):
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(f"sqlite:///{exported.out / 'mlflow.db'}")
    champion = "models:/tiny-clusters@champion"
    folder = mlflow.models.get_model_info(str(exported.model_dir))
    assert folder.signature.inputs.input_names() == ["token_ids"]  # objects, checked by the model itself
    assert folder.signature.outputs.inputs[0].type == np.float32
    assert mlflow.models.get_model_info(champion).signature == folder.signature
    arch = fulu_nas.load(exported.model_dir).arch
    for uri in (str(exported.model_dir), champion):
        model = mlflow.pyfunc.load_model(uri)
        for bad, words in bad_inputs(arch.vocab_size, arch.max_seq_len):
            with pytest.raises(MlflowException) as raised:
                model.predict(bad)
            message = raised.value.message
            assert words in message, (uri, bad.shape, message)
            assert raised.value.error_code == "INVALID_PARAMETER_VALUE", (uri, bad.shape, message)
            assert "Traceback" not in message and len(message) < 500, message


@pytest.mark.slow
def test_loading_the_pyfunc_asks_nothing_of_the_console(exported):
    """MLflow runs the model's code on every load; it warns about a predict without type hints."""
    import mlflow

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(str(exported.model_dir))
    assert not [str(w.message) for w in caught if "type hint" in str(w.message).lower()]
    arch = fulu_nas.load(exported.model_dir).arch
    assert model.predict(np.zeros((1, arch.max_seq_len), dtype=np.int64)).shape[:2] == (1, arch.max_seq_len)


@pytest.mark.slow
def test_the_console_carries_the_commands_own_lines_alone(tmp_path):
    """A fresh process, as a user runs it: no library's log lines, download bars or notices between
    the search's progress and results and the export's own three lines."""
    def fulu(*args):
        done = subprocess.run([sys.executable, "-m", "fulu_nas", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    out = tmp_path / "out"
    searched = fulu("search", "+experiment=tiny", "study.n_trials=2", f"hydra.run.dir={out}")
    exported = fulu("export", "study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={tmp_path / 'model'}")
    for console in (searched, exported):
        for noise in (" INFO ", "[INFO]", "Warning", "Downloading artifacts", "Successfully registered",
                      "Created version"):
            assert noise not in console, console
    import mlflow

    from fulu_nas.deploy.export import fingerprint
    from fulu_nas.deploy.files import manifest_digest

    best = load_study(out).best_trial.number
    version = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_model_version("tiny-clusters", "1")
    files = manifest_digest(json.loads(version.tags["fulu.files"]))
    assert version.tags["fulu.fingerprint"] == fingerprint(tmp_path / "model")
    assert exported.splitlines() == [
        f"exporting trial {best}: trial=best (the best trial of the search; no confirmation)",
        f"exported trial {best} of study tiny-clusters to {tmp_path / 'model'} (fingerprint "
        f"{fingerprint(tmp_path / 'model')})",
        f"registered as models:/tiny-clusters@champion (version 1, files {files})"]


@pytest.mark.slow
def test_served_bad_input_is_a_short_json_error(exported):
    """Each refused with status 400 and one short message. Floats and booleans were answered 200, as the
    ids 1 and 0: MLflow's scoring server cast the JSON to the signature's int64 before the model saw it."""
    model = fulu_nas.load(exported.model_dir)
    arch = model.arch
    with torch.no_grad():
        expected = model(torch.tensor([[1, 0]])).logits.numpy()
    with serving(exported.model_dir) as post:
        status, answer = post({"inputs": [[1, 0]]})  # integers work as before
        assert status == 200, answer
        np.testing.assert_allclose(np.asarray(answer["predictions"]), expected, rtol=1e-5, atol=1e-5)
        for payload, words in (({"inputs": [[1.5, 2]]}, "expected integer token ids, got 1.5 (float)"),
                               ({"inputs": [[1.9, 0.2]]}, "expected integer token ids, got 1.9 (float)"),
                               ({"inputs": [[True, False]]}, "expected integer token ids, got True (bool)"),
                               ({"inputs": [[0, "1"]]}, "expected integer token ids, got '1' (str)"),
                               ({"inputs": [[0, arch.vocab_size]]}, f"0..{arch.vocab_size - 1}"),
                               ({"inputs": [[0] * (arch.max_seq_len + 1)]}, f"at most {arch.max_seq_len}"),
                               ({"inputs": [[[0, 1]]]}, "shape"),
                               ({"inputs": [[1, 2], [3]]}, "shape")):
            status, answer = post(payload)
            assert status == 400, (payload, answer)
            assert "stack_trace" not in answer and len(answer["message"]) < 500, answer
            assert answer["error_code"] == "INVALID_PARAMETER_VALUE" and words in answer["message"], answer


def test_an_export_with_the_older_integer_signature_is_served_with_the_current_one(exported, tmp_path, monkeypatch,
                                                                                   capsys):
    """Exports made before the signature declared the token ids as objects keep their int64 signature, for
    which MLflow's scoring server casts 1.9 to the id 1 before the model can refuse it. A folder is served
    with fulu-nas's own pyfunc and signature, so such input is refused; a registered version of that kind
    is served with a warning saying so (and to export again)."""
    from mlflow.exceptions import MlflowException

    from fulu_nas.deploy.serve import casting_signature, load_pyfunc
    from fulu_nas.search import serve_command

    older = tmp_path / "older"
    shutil.copytree(exported.model_dir, older)
    mlmodel = yaml.safe_load((older / "MLmodel").read_text())
    mlmodel["signature"]["inputs"] = json.dumps(
        [{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1, -1]}, "name": "token_ids"}])
    (older / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    checksums = json.loads((older / "checksums.json").read_text())
    checksums["MLmodel"] = hashlib.sha256((older / "MLmodel").read_bytes()).hexdigest()
    (older / "checksums.json").write_text(json.dumps(checksums))
    assert "export the model again" in casting_signature(older)  # what a registered version of it is told

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_pyfunc(older)
    assert not [w for w in caught if "token ids as integers" in str(w.message)]
    assert model.predict(np.array([[1, 0]], dtype=np.int64)).shape[:2] == (1, 2)
    with pytest.raises(MlflowException, match=r"got 1.5 \(float\)"):
        model.predict(np.array([[1.5, 2]], dtype=object))

    monkeypatch.setattr(serve_command, "run_server", lambda command, **_: 0)  # the checks, not the server
    assert main(["serve", str(older), "--port", str(free_port())]) == 0
    assert "warning" not in capsys.readouterr().err


def flip_byte(archive: Path, record_suffix: str = "data/weights/weight_0") -> None:
    """Change one byte inside a record of a zip archive (stored uncompressed, as torch writes them)."""
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record_suffix))
    name_len, extra_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little"), \
        int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + 3] ^= 0x40
    archive.write_bytes(bytes(data))


class RunsCode:
    """A pickle that runs ``code`` when it is loaded."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


def rewrite_archive(src: Path, dst: Path, records: dict[str, bytes]) -> None:
    """A copy of the zip ``src`` with ``records`` (names below its root folder) replaced or added."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        root = zin.namelist()[0].split("/")[0]
        for info in zin.infolist():
            name = info.filename.split("/", 1)[1]
            zout.writestr(info.filename, records.get(name, zin.read(info)))
        for name in records.keys() - {i.filename.split("/", 1)[1] for i in zin.infolist()}:
            zout.writestr(f"{root}/{name}", records[name])


def craft_archive(src: Path, dst: Path, marker: Path, where: str) -> None:
    """A copy of the program ``src`` with a pickle that creates ``marker`` when torch.export.load reads it:
    ``use_pickle`` a weight flagged as pickled (as torch.export.save writes tensors it cannot store raw), or
    ``sample_inputs`` the example inputs replaced (torch retries them with ``weights_only=False``)."""
    payload = pickle.dumps(RunsCode(f"open({str(marker)!r}, 'w').close()"))
    if where == "sample_inputs":
        rewrite_archive(src, dst, {"data/sample_inputs/model.pt": payload})
        return
    with zipfile.ZipFile(src) as z:
        config_name = next(n for n in z.namelist() if n.endswith("data/weights/model_weights_config.json"))
        config = json.loads(z.read(config_name))
    target = next(iter(config["config"].values()))["path_name"]
    for meta in config["config"].values():  # every weight stored in that record (tied ones share it)
        meta["use_pickle"] = meta["use_pickle"] or meta["path_name"] == target
    rewrite_archive(src, dst, {"data/weights/model_weights_config.json": json.dumps(config).encode(),
                               f"data/weights/{target}": payload})


def test_the_archive_check_refuses_what_torch_export_load_would_unpickle(tmp_path):
    from fulu_nas.deploy.pt2_check import NOT_AN_ARCHIVE, archive_problems

    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.randn(4, 3),)), str(clean))
    assert archive_problems(clean.read_bytes()) == []
    marker = tmp_path / "code-ran"
    cases = {"use_pickle": "pickled", "sample_inputs": "weights_only=True"}  # name -> words of the refusal
    for where in cases:
        craft_archive(clean, tmp_path / f"{where}.pt2", marker, where)
    constants = {"config": {"obj": {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False,
                                    "tensor_meta": None}}}
    for name, records, words in (
            ("opaque", {"data/constants/model_constants_config.json": json.dumps(constants).encode(),
                        "data/constants/opaque_obj_0": pickle.dumps(RunsCode("pass"))}, "not a plain tensor"),
            ("aoti", {"data/aotinductor/model/model.so": b"\x7fELF"}, "shared library"),
            ("legacy", {"data/weights/model.pt": pickle.dumps(RunsCode("pass"))}, "may unpickle")):
        rewrite_archive(clean, tmp_path / f"{name}.pt2", records)
        cases[name] = words
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    cases["junk"] = "not a torch.export archive"
    for name, words in cases.items():
        problems = archive_problems((tmp_path / f"{name}.pt2").read_bytes())
        assert any(words in p for p in problems), (name, problems)
    assert not marker.exists()
    # A file cut short is said to be one, in torch's first sentence (its miniz error went on with advice to
    # its developers), not as code it would run.
    from fulu_nas.deploy.pt2_check import UnsafeProgramError, check_archive

    with pytest.raises(UnsafeProgramError) as refused:
        check_archive(clean.read_bytes()[:-100], "model.pt2")
    # Cut at some lengths, torch's reader seeked before the file's start: a ValueError out of the check.
    data = clean.read_bytes()
    for length in range(0, len(data), 7):
        assert any(NOT_AN_ARCHIVE in p for p in archive_problems(data[:length])), length
    assert str(refused.value) == (
        "model.pt2: refused: not a torch.export archive (cut short, damaged or another kind of file: "
        "PytorchStreamReader failed reading zip archive: invalid header or archive is corrupted); torch.export.load "
        "would retry it as a legacy archive, whose tensors are pickles")


def edit_graph(src: Path, dst: Path, edit) -> None:
    """A copy of the program ``src`` whose graph (``models/model.json``) ``edit`` changed in place."""
    with zipfile.ZipFile(src) as z:
        graph = json.loads(z.read(next(n for n in z.namelist() if n.endswith("models/model.json"))))
    edit(graph)
    rewrite_archive(src, dst, {"models/model.json": json.dumps(graph).encode()})


def test_the_archive_check_refuses_graphs_that_run_code_without_any_pickle(tmp_path):
    """Three ways a pickle-free program runs code: sympy evaluates its shape expressions on load, the
    module executes its guards code on every call, and a node may call any function under ``torch``."""
    from fulu_nas.deploy.pt2_check import archive_problems

    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(4, 3),), dynamic_shapes=({0: batch},))
    clean = tmp_path / "clean.pt2"
    torch.export.save(program, str(clean))
    assert archive_problems(clean.read_bytes()) == []
    marker = tmp_path / "code-ran"
    run = f"open({str(marker)!r}, 'w').close()"

    def expression(graph):  # every shape expression of the graph made to run code as sympy parses it
        def walk(value):
            for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
                if key == "expr_str":
                    value[key] = f"__import__('builtins').exec({run!r}) or {item}"
                elif isinstance(item, (dict, list)):
                    walk(item)
        walk(graph)

    def guards(graph):
        graph["guards_code"] = [f"exec(bytes.fromhex('{run.encode().hex()}').decode()) is None"]  # no quotes inside

    def target(graph):
        node = next(n for n in graph["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten"))
        node["target"] = "torch.hub.load"

    for edit, words, how in ((expression, "shape expression naming '__import__'", "load"),
                             (guards, "guards code", "call"), (target, "'torch.hub.load'", None)):
        crafted = tmp_path / f"{edit.__name__}.pt2"
        edit_graph(clean, crafted, edit)
        problems = archive_problems(crafted.read_bytes())
        assert any(words in p for p in problems), (edit.__name__, problems)
        if how:  # the exploit is real: torch runs the code
            with contextlib.suppress(Exception):
                loaded = torch.export.load(str(crafted))
                if how == "call":
                    loaded.module()(torch.randn(2, 3))
            assert marker.exists(), edit.__name__
            marker.unlink()


def test_the_archive_check_allows_only_real_aten_overloads(tmp_path):
    """A node target 'torch.ops.aten.<a>.<b>' passed for any two words, dunder attributes included, which
    torch's loader resolves with getattr: only real ATen operator overloads pass now."""
    from fulu_nas.deploy.pt2_check import archive_problems

    clean = tmp_path / "clean.pt2"
    torch.export.save(torch.export.export(torch.nn.Linear(3, 2), (torch.randn(4, 3),)), str(clean))
    assert archive_problems(clean.read_bytes()) == []
    for target in ("torch.ops.aten.add.__setattr__", "torch.ops.aten.add.__class__", "torch.ops.aten.__class__.mro",
                   "torch.ops.aten.__init__.__globals__", "torch.ops.aten._ops.default", "torch.ops.aten.add._op",
                   "torch.ops.aten.no_such_operator.default", "torch.ops.aten.add.no_such_overload",
                   "torch.ops.aten.from_file.default"):
        def edit(graph, target=target):
            node = next(n for n in graph["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten"))
            node["target"] = target

        crafted = tmp_path / "crafted.pt2"
        edit_graph(clean, crafted, edit)
        problems = archive_problems(crafted.read_bytes())
        assert any(f"calling {target!r}, not an ATen operator" in p for p in problems), (target, problems)
    for real in ("torch.ops.aten.add.Tensor", "torch.ops.aten._to_copy.default", "torch.ops.aten.__and__.Tensor"):
        edit_graph(clean, tmp_path / "real.pt2", lambda graph, real=real: next(
            n for n in graph["graph_module"]["graph"]["nodes"] if n["target"].startswith("torch.ops.aten")
        ).__setitem__("target", real))
        assert archive_problems((tmp_path / "real.pt2").read_bytes()) == [], real


@contextlib.contextmanager
def code_added_to_the_champion(client, version, tmp_path):
    """The version's pyfunc.py in the artifact store with a line added that makes a marker file (what
    someone who can write there would do): yields ``(the stored folder, the marker)``; the files are put
    back after."""
    stored = Path(client.get_model_version_download_uri(version.name, version.version).removeprefix("file://"))
    assert (stored / "pyfunc.py").is_file(), stored
    backup = tmp_path / "backup"
    shutil.copytree(stored, backup)
    marker = tmp_path / "code-ran"
    try:
        with open(stored / "pyfunc.py", "a") as f:
            f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
        yield stored, marker
    finally:
        shutil.rmtree(stored)
        shutil.copytree(backup, stored)


@pytest.mark.slow
def test_serving_checks_the_registered_files_against_the_registry_before_mlflow_runs_them(exported, tmp_path, capsys):
    """MLflow runs a model's pyfunc.py as it loads it: someone who can write to the artifact store runs
    code in every server of the model. fulu-nas serve (and load_pyfunc) check each file against the
    SHA-256 values that fulu-nas export recorded as the version's tag, in the tracking database."""
    import mlflow

    from fulu_nas.deploy.serve import load_pyfunc

    tracking = f"sqlite:///{exported.out / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    version = client.get_model_version_by_alias("tiny-clusters", "champion")
    with code_added_to_the_champion(client, version, tmp_path) as (_, marker):
        mlflow.set_tracking_uri(tracking)
        mlflow.pyfunc.load_model("models:/tiny-clusters@champion")
        assert marker.exists()  # the exploit is real: MLflow ran the added line
        marker.unlink()
        # named by its path within the model, not the private download (gone once the command ends)
        with pytest.raises(FuluConfigError, match="^models:/tiny-clusters@champion: pyfunc.py: checksum mismatch"):
            load_pyfunc("models:/tiny-clusters@champion", tracking_uri=tracking)
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking}
        result = subprocess.run([sys.executable, "-m", "fulu_nas", "serve", "models:/tiny-clusters@champion",
                                 "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 2 and "pyfunc.py: checksum mismatch" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not marker.exists()
    for uri, words in (("models:/nothing@champion", "not found in the model registry"),
                       ("models:/tiny-clusters/x", "models:/NAME@ALIAS or models:/NAME/VERSION")):
        assert main(["serve", uri, "--tracking-uri", tracking]) == 2
        assert words in capsys.readouterr().err
    missing = tmp_path / "nowhere" / "mlflow.db"
    # named as the user gave it (the search's tracking.uri key meant nothing here)
    for options, words in ((["--tracking-uri", "foo://x"], "error: --tracking-uri: unsupported scheme"),
                           (["--tracking-uri", "http://127.0.0.1:1"],
                            "error: --tracking-uri: cannot reach the MLflow server at http://127.0.0.1:1"),
                           (["--tracking-uri", f"sqlite:///{missing}"], "no such database"),
                           (["--tracking-uri", tracking, "--port", "99999"], "port number in 1..65535")):
        assert main(["serve", "models:/tiny-clusters@champion", *options]) == 2
        assert words in capsys.readouterr().err
    assert not missing.parent.exists()  # MLflow would have made the folder and an empty database


@pytest.mark.slow
def test_load_pyfunc_of_a_folder_prints_nothing(exported):
    """load_pyfunc(folder) in a user's program printed MLflow's 'INFO mlflow.pyfunc: Validating input example'
    line and its 'Downloading artifacts' bars (the command line mutes MLflow; the Python API did not)."""
    code = ("import sys, numpy as np; from fulu_nas.deploy.serve import load_pyfunc; "
            "print(load_pyfunc(sys.argv[1]).predict(np.array([[1, 2, 3]])).shape)")
    result = subprocess.run([sys.executable, "-c", code, str(exported.model_dir)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("(1, 3, 4)\n", ""), result.stderr


@pytest.mark.slow
def test_a_registered_model_whose_artifact_store_is_gone_and_bad_serve_options_are_one_message(exported, capsys):
    """The study's artifact folder moved or deleted (or an artifact server down) was MLflow's 38-line
    traceback, exit 1; an empty --host served on every interface; '--port 1_000' and a version in another
    script's digits were read as numbers."""
    import mlflow

    from fulu_nas.deploy.serve import load_pyfunc

    tracking = f"sqlite:///{exported.out / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking)
    version = client.get_model_version_by_alias("tiny-clusters", "champion")
    store = Path(client.get_model_version_download_uri("tiny-clusters", version.version).removeprefix("file://"))
    moved = store.parent.with_name(store.parent.name + ".moved")
    store.parent.rename(moved)
    try:
        words = (f"models:/tiny-clusters/{version.version}: its files could not be fetched from the artifact store "
                 f"file://{store} (No such artifact: 'artifacts'): were the study's artifacts")
        assert main(["serve", "models:/tiny-clusters@champion", "--tracking-uri", tracking]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {words}") and err.count("\n") == 1, err
        with pytest.raises(FuluConfigError, match=re.escape(words)):
            load_pyfunc("models:/tiny-clusters@champion", tracking_uri=tracking)
    finally:
        moved.rename(store.parent)
    for options, words in ((["--host", ""], "error: --host: empty; give the address to listen on"),
                           (["--host", " "], "error: --host: empty"),
                           (["--port", "1_000"], "argument --port: must be a port number in 1..65535, got '1_000'"),
                           (["--port", "\u0661\u0660\u0660\u0660"], "argument --port: must be a port number")):
        assert main(["serve", str(exported.model_dir), *options]) == 2
        assert words in capsys.readouterr().err
    assert main(["serve", "models:/tiny-clusters/\u0661", "--tracking-uri", tracking]) == 2
    assert "expected models:/NAME@ALIAS or models:/NAME/VERSION" in capsys.readouterr().err


@pytest.mark.slow
def test_the_printed_fingerprint_checks_the_registered_model_and_a_tampered_one_is_still_refused(exported, tmp_path):
    """``fulu-nas export`` prints the folder's fingerprint and tags the version with it; --sha256 /
    expected_sha256 refused it for models:/ (only the files hash of the 'registered as' line passed).
    Either is taken now, and every file is still checked against the registry's fulu.files."""
    import mlflow

    from fulu_nas.deploy.export import fingerprint
    from fulu_nas.deploy.files import manifest_digest, manifest_json
    from fulu_nas.deploy.serve import load_pyfunc

    tracking = f"sqlite:///{exported.out / 'mlflow.db'}"
    champion = "models:/tiny-clusters@champion"
    client = mlflow.MlflowClient(tracking)
    version = client.get_model_version_by_alias("tiny-clusters", "champion")
    printed = fingerprint(exported.model_dir)
    assert version.tags["fulu.fingerprint"] == printed
    files = manifest_digest(json.loads(version.tags["fulu.files"]))
    x = np.array([[1, 2, 3]])
    for expected in (printed, printed.upper(), files):
        assert load_pyfunc(champion, expected_sha256=expected, tracking_uri=tracking).predict(x).shape[:2] == (1, 3)
    with pytest.raises(FuluConfigError, match="is not the expected 0{64}: neither the fingerprint"):
        load_pyfunc(champion, expected_sha256="0" * 64, tracking_uri=tracking)
    # the files hash given for the folder: said to be that, not "its files and checksums were replaced"
    for load_folder in (fulu_nas.load, lambda folder, expected_sha256: load_pyfunc(folder, expected_sha256)):
        with pytest.raises(FuluConfigError, match=f"checksums.json: {files} is the files hash of the version the "
                                                  "export registered .* against the export's fingerprint"):
            load_folder(exported.model_dir, expected_sha256=files)

    with code_added_to_the_champion(client, version, tmp_path) as (stored, marker):
        try:
            for expected in (printed, files):  # files changed in the artifact store
                with pytest.raises(FuluConfigError, match="pyfunc.py: checksum mismatch"):
                    load_pyfunc(champion, expected_sha256=expected, tracking_uri=tracking)
            # ... and their new hashes written into the tracking database too: the files hash still tells
            forged = {**json.loads(version.tags["fulu.files"]),
                      "pyfunc.py": hashlib.sha256((stored / "pyfunc.py").read_bytes()).hexdigest()}
            client.set_model_version_tag("tiny-clusters", version.version, "fulu.files", manifest_json(forged))
            with pytest.raises(FuluConfigError, match="is not the expected"):
                load_pyfunc(champion, expected_sha256=files, tracking_uri=tracking)
            assert not marker.exists()
        finally:
            client.set_model_version_tag("tiny-clusters", version.version, "fulu.files", version.tags["fulu.files"])
    assert "files hash" in subprocess.run([sys.executable, "-m", "fulu_nas", "serve", "--help"], capture_output=True,
                                          text=True, timeout=120).stdout


@pytest.mark.slow
def test_load_pyfunc_takes_a_path(exported):
    """A pathlib.Path was an AttributeError ('PosixPath' object has no attribute 'startswith')."""
    from fulu_nas.deploy.export import fingerprint
    from fulu_nas.deploy.serve import load_pyfunc

    folder = Path(exported.model_dir)
    model = load_pyfunc(folder, expected_sha256=fingerprint(folder))
    assert model.predict(np.array([[1, 2]])).shape[:2] == (1, 2)
    with pytest.raises(FuluConfigError, match="source: 123 is neither"):
        load_pyfunc(123)


@pytest.mark.slow
def test_impossible_numbers_in_the_architecture_are_one_clear_error(exported, tmp_path):
    """A folder that agrees with itself (checksums rewritten) loaded a NaN or negative norm_eps (every
    logit NaN); ``vocab_size: true`` was a raw TypeError from torch."""
    from fulu_nas.models import ArchConfig

    cases = {"norm_eps": [float("nan"), -1.0, 0.0, float("inf"), True, "1e-6"],
             "vocab_size": [True, 24.0, "24"], "num_layers": [1.0], "num_classes": [False]}
    for field, values in cases.items():
        for value in values:
            copy = tmp_path / f"{field}-{values.index(value)}"
            shutil.copytree(exported.model_dir, copy)
            config = yaml.safe_load((copy / "config.yaml").read_text())
            config["architecture"][field] = value
            (copy / "config.yaml").write_text(yaml.safe_dump(config))
            forge_checksums(copy)
            words = "a finite number > 0" if field == "norm_eps" else "an integer"
            with pytest.raises(FuluConfigError, match=rf"config.yaml: not a valid architecture \({field} must be "
                                                      f"{words}, got ") as raised:
                fulu_nas.load(copy)
            assert_one_clear_line(raised, copy)
            with pytest.raises(FuluConfigError, match=f"{field} must be {words}"):
                ArchConfig(**{field: value})


def forge_checksums(folder: Path) -> None:
    """What someone who swaps files of a folder also does: record the new files' SHA-256 wherever the
    folder records them (checksums.json, the pyfunc's configuration in MLmodel)."""
    program = hashlib.sha256((folder / "artifacts" / "model.pt2").read_bytes()).hexdigest()
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    config = mlmodel["flavors"]["python_function"].get("config") or {}
    if "program_sha256" in config:
        config["program_sha256"] = program
        (folder / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    listing = json.loads((folder / "checksums.json").read_text())
    (folder / "checksums.json").write_text(json.dumps(
        {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in listing}))


def test_serving_refuses_a_malformed_fingerprint_before_reading_anything(exported):
    """``expected_sha256`` from Python: an AttributeError (".strip") on the registry path before."""
    from fulu_nas.deploy.serve import checked_model

    for source in ("models:/tiny-clusters@champion", str(exported.model_dir)):
        with pytest.raises(FuluConfigError, match="expected_sha256: 123 is not a SHA-256"):
            with checked_model(source, 123, f"sqlite:///{exported.out / 'mlflow.db'}"):
                pass


@pytest.mark.slow
def test_a_changed_byte_of_the_served_program_is_refused(exported, tmp_path):
    import mlflow

    copy = tmp_path / "copy"
    shutil.copytree(exported.model_dir, copy)
    flip_byte(copy / "artifacts" / "model.pt2")
    with pytest.raises(FuluConfigError, match="artifacts/model.pt2: checksum mismatch"):
        fulu_nas.load(copy)
    with pytest.raises(Exception, match="artifacts/model.pt2: checksum mismatch"):
        mlflow.pyfunc.load_model(str(copy))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["use_pickle", "sample_inputs"])
def test_a_program_that_would_unpickle_is_refused_and_runs_nothing(exported, tmp_path, where):
    import mlflow

    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt2"
    craft_archive(exported.model_dir / "model.pt2", crafted, marker, where)
    with contextlib.suppress(Exception):  # the exploit is real: torch.export.load runs the pickle
        torch.export.load(str(crafted))
    assert marker.exists()
    marker.unlink()

    copy = tmp_path / "copy"
    shutil.copytree(exported.model_dir, copy)
    for name in ("model.pt2", "artifacts/model.pt2"):
        shutil.copyfile(crafted, copy / name)
    forge_checksums(copy)
    with pytest.raises(FuluConfigError, match="model.pt2: refused.*unpickle"):
        fulu_nas.load(copy)
    with pytest.raises(Exception, match="model.pt2: refused.*unpickle"):
        mlflow.pyfunc.load_model(str(copy))
    assert not marker.exists()


@pytest.mark.slow
def test_tampered_or_missing_files_are_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported.model_dir, copy)
    weights = copy / "model.safetensors"
    flip_last_byte(weights)
    with pytest.raises(FuluConfigError, match="model.safetensors: checksum mismatch"):
        fulu_nas.load(copy)
    (copy / "model.pt2").unlink()
    with pytest.raises(FuluConfigError, match="model.pt2: missing"):
        fulu_nas.load(copy)
    shutil.copytree(exported.model_dir, copy, dirs_exist_ok=True)
    (copy / "code").mkdir(exist_ok=True)  # MLflow puts the model's code/ first on sys.path
    (copy / "code" / "sitecustomize.py").write_text("print('hello')\n")
    with pytest.raises(FuluConfigError, match="sitecustomize.py: not listed in checksums.json"):
        fulu_nas.load(copy)
    with pytest.raises(FuluConfigError, match="not an export directory"):
        fulu_nas.load(tmp_path / "nowhere")


@pytest.mark.parametrize("url", ["https://example.com/model", "s3://bucket/model", "runs:/0123/model"])
def test_serve_names_a_url_it_does_not_take(url, tmp_path, monkeypatch, capsys):
    """`https://example.com/model` was read as a folder: 'https:/example.com/model: not an export directory'."""
    monkeypatch.chdir(tmp_path)
    assert main(["serve", url, "--port", str(free_port())]) == 2
    assert capsys.readouterr().err == (f"error: {url}: not a model fulu-nas serves (models:/NAME@ALIAS, "
                                       "models:/NAME/VERSION, or an export folder on this machine)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_links_and_names_outside_the_folder_are_refused(exported, tmp_path):
    """Only regular files inside the folder count: a link passes a check by pointing at the exported
    bytes and can point elsewhere by the time a loader (or MLflow, which puts code/ on sys.path) reads it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(exported.model_dir / "model.safetensors", outside / "model.safetensors")
    (outside / "evil.py").write_text("raise SystemExit('ran')\n")
    cases = {"weights": lambda c: ((c / "model.safetensors").unlink(),
                                   (c / "model.safetensors").symlink_to(outside / "model.safetensors")),
             "code folder": lambda c: (c / "code" / "more").symlink_to(outside, target_is_directory=True),
             "dangling": lambda c: (c / "gone").symlink_to(tmp_path / "nothing")}
    for name, change in cases.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(exported.model_dir, copy)
        change(copy)
        with pytest.raises(FuluConfigError, match="symbolic link"):
            fulu_nas.load(copy)
    copy = tmp_path / "escape"
    shutil.copytree(exported.model_dir, copy)
    listing = json.loads((copy / "checksums.json").read_text())
    listing["../outside/model.safetensors"] = listing["model.safetensors"]
    (copy / "checksums.json").write_text(json.dumps(listing))
    with pytest.raises(FuluConfigError, match="is not a file inside the folder"):
        fulu_nas.load(copy)


@pytest.mark.slow
def test_the_fingerprint_refuses_a_folder_whose_files_and_checksums_were_both_replaced(exported, tmp_path):
    from fulu_nas.deploy.export import fingerprint

    exported_fingerprint = fingerprint(exported.model_dir)
    assert fulu_nas.load(exported.model_dir, expected_sha256=exported_fingerprint).arch is not None
    copy = tmp_path / "copy"
    shutil.copytree(exported.model_dir, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["architecture"]["norm_eps"] = 1e6
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    forge_checksums(copy)
    assert fulu_nas.load(copy).arch.norm_eps == 1e6  # self-consistent: only the fingerprint tells
    with pytest.raises(FuluConfigError, match="checksums.json: its SHA-256 is not the expected"):
        fulu_nas.load(copy, expected_sha256=exported_fingerprint)


@pytest.mark.slow
def test_unreadable_checksums_and_configs_that_do_not_fit_the_weights_are_clear_errors(exported, tmp_path):
    """Each a FuluConfigError naming the file; a configuration asking for huge tensors is compared with
    the weights' header before anything of that size is allocated."""
    cases = {"not json": ("checksums.json", "{", "not valid JSON"),
             "a list": ("checksums.json", "[1, 2]", "expected an object"),
             "a bad hash": ("checksums.json", json.dumps({"config.yaml": "abc"}), "is not a SHA-256"),
             "no architecture": ("config.yaml", yaml.safe_dump({"format": 1, "architecture": [1]}), "no architecture"),
             "huge vocabulary": ("config.yaml", None, "does not describe these weights")}
    for name, (file, text, words) in cases.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(exported.model_dir, copy)
        if text is None:
            config = yaml.safe_load((copy / "config.yaml").read_text())
            config["architecture"]["vocab_size"] = 2**24  # the most ArchConfig takes: refused, not allocated
            text = yaml.safe_dump(config)
        (copy / file).write_text(text)
        if file != "checksums.json":
            forge_checksums(copy)
        with pytest.raises(FuluConfigError, match=words):
            fulu_nas.load(copy)


def assert_one_clear_line(error: pytest.ExceptionInfo, folder: Path) -> None:
    """The message of a FuluConfigError from loading ``folder``: one line naming the user's folder, not the
    private copy it was read from."""
    message = str(error.value)
    assert "\n" not in message and str(folder) in message and "fulu-nas-checked-" not in message, message


@pytest.mark.slow
def test_damaged_or_missing_files_with_regenerated_checksums_are_clear_errors(exported, tmp_path):
    """Files replaced along with their checksums still pass the check, so the loader reads them with care:
    each case is one FuluConfigError naming the file and the problem (they were raw errors from torch,
    safetensors, PyYAML or the file system, naming the private copy)."""
    weights = (exported.model_dir / "model.safetensors").read_bytes()
    config = yaml.safe_load((exported.model_dir / "config.yaml").read_text())
    layers = config["architecture"]["num_layers"]
    deeper = {**config, "architecture": {**config["architecture"], "num_layers": layers + 1}}

    def unlisted(folder: Path, name: str) -> None:  # gone, and gone from checksums.json too
        (folder / name).unlink()
        listing = json.loads((folder / "checksums.json").read_text())
        del listing[name]
        (folder / "checksums.json").write_text(json.dumps(listing))

    cases = {"one layer more": (lambda c: (c / "config.yaml").write_text(yaml.safe_dump(deeper)),
                                rf"model.safetensors: config.yaml does not describe these weights: no tensor "
                                rf"blocks\.{layers}\..* and \d+ more in the file"),  # the first few, and how many more
             "truncated weights": (lambda c: (c / "model.safetensors").write_bytes(weights[:len(weights) // 2]),
                                   "model.safetensors: not a safetensors file"),
             "empty weights": (lambda c: (c / "model.safetensors").write_bytes(b""),
                               "model.safetensors: not a safetensors file"),
             "not yaml": (lambda c: (c / "config.yaml").write_text("format: 1\narchitecture: {num_layers: [\n"),
                          r"config.yaml: not valid YAML \(.* at line 3, column 1\)"),
             "not utf-8": (lambda c: (c / "config.yaml").write_bytes(b"format: \xff\n"),
                           "config.yaml: not valid YAML"),
             "a nul character": (lambda c: (c / "config.yaml").write_text("format: 1\x00\n"),
                                 "config.yaml: not valid YAML"),
             # a few hundred bytes standing for 10**6 list items (10**9 with three lines more): its message
             # showed them all
             "yaml aliases": (lambda c: (c / "config.yaml").write_text(
                 "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                 + "".join(f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                           for p, n in zip("abcde", "bcdef", strict=True))
                 + "format: *f\n"), r"^\S+/config.yaml: holds YAML aliases \(\*name\), which an export never writes$"),
             # PyYAML composes by recursion: 2 KB of brackets was a RecursionError (50 KB: a minute, then that)
             "deep yaml": (lambda c: (c / "config.yaml").write_text("format: " + "[" * 1000 + "]" * 1000 + "\n"),
                           r"^\S+/config.yaml: nested more than 32 levels deep, which an export never writes$"),
             "huge integer": (lambda c: (c / "config.yaml").write_text("format: " + "7" * 5000 + "\n"),
                              r"^\S+/config.yaml: not a configuration an export writes \(Exceeds the limit \(4300 "
                              r"digits\)"),
             "deep checksums": (lambda c: (c / "checksums.json").write_text("[" * 100000 + "]" * 100000),
                                "checksums.json: not valid JSON here \\(nested too deeply for a list of files\\)"),
             "no config": (lambda c: unlisted(c, "config.yaml"), "config.yaml: missing"),
             "no weights": (lambda c: unlisted(c, "model.safetensors"), "model.safetensors: missing")}
    for name, (damage, words) in cases.items():
        copy = tmp_path / name.replace(" ", "-")
        shutil.copytree(exported.model_dir, copy)
        damage(copy)
        if not name.startswith(("no ", "deep checksums")):
            forge_checksums(copy)
        with pytest.raises(FuluConfigError, match=words) as raised:
            fulu_nas.load(copy)
        assert_one_clear_line(raised, copy)


@pytest.mark.slow
def test_bad_arguments_to_load_are_named(exported):
    """expected_sha256 is a fingerprint (64 hex digits); map_location a device of this machine that holds
    data. Each was a raw AttributeError, SafetensorError or RuntimeError from deep inside the load."""
    from fulu_nas.deploy.export import fingerprint, verify

    folder = exported.model_dir
    for value in (123, "abc", "g" * 64, b"0" * 64):
        for check in (fulu_nas.load, verify):
            with pytest.raises(FuluConfigError, match=f"expected_sha256: {re.escape(repr(value))} is not a SHA-256"):
                check(folder, expected_sha256=value)
    absent = [f"cuda:{torch.cuda.device_count()}"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device, words in (("gpu0", "not a device"), (None, "not a device"), ("meta", "holds no data"),
                          *[(d, "(torch .* sees no CUDA device here|not a device here)") for d in absent]):
        with pytest.raises(FuluConfigError, match=f"map_location: {re.escape(repr(device))}: {words}"):
            fulu_nas.load(folder, map_location=device)
    model = fulu_nas.load(folder, map_location=torch.device("cpu"), expected_sha256=fingerprint(folder).upper())
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.slow
def test_export_refuses_trial_weights_changed_in_the_artifact_store(exported, monkeypatch, capsys):
    """A trial's weights are checked against the SHA-256 the search recorded on its run (in the tracking
    database) before they are exported, measured and registered as that trial's."""
    import mlflow

    monkeypatch.chdir(exported.root)
    best = max((t for t in exported.study.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.values[0])
    client = mlflow.MlflowClient(f"sqlite:///{exported.out / 'mlflow.db'}")
    run = client.get_run(best.user_attrs["weights_run_id"])
    weights = Path(run.info.artifact_uri.removeprefix("file://")) / "model.safetensors"
    original = weights.read_bytes()
    try:
        flip_last_byte(weights)
        assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={exported.out}", f"trial={best.number}",
                     "out=poisoned"]) == 2
        assert "are not the ones the search uploaded" in capsys.readouterr().err
        assert not (exported.root / "poisoned").exists()
    finally:
        weights.write_bytes(original)


@pytest.mark.slow
def test_export_refuses_saved_trial_weights_that_are_not_finite(exported, monkeypatch, capsys):
    """Weights the search uploaded with NaN in them (their recorded SHA-256 matching) were evaluated,
    measured, written and registered, for fulu_nas.load to refuse them."""
    import mlflow
    from safetensors.torch import load_file, save_file

    from fulu_nas.deploy.files import sha256_file
    from fulu_nas.search.tracking import WEIGHTS_SHA256_TAG

    monkeypatch.chdir(exported.root)
    best = max((t for t in exported.study.trials if t.state == TrialState.COMPLETE), key=lambda t: -t.values[0])
    client = mlflow.MlflowClient(f"sqlite:///{exported.out / 'mlflow.db'}")
    run = client.get_run(best.user_attrs["weights_run_id"])
    weights = Path(run.info.artifact_uri.removeprefix("file://")) / "model.safetensors"
    original, recorded = weights.read_bytes(), run.data.tags[WEIGHTS_SHA256_TAG]
    tensors = load_file(str(weights))
    name = next(n for n in sorted(tensors) if "experts" in n)
    tensors[name].view(-1)[-1] = float("inf")
    try:
        save_file(tensors, str(weights))
        client.set_tag(run.info.run_id, WEIGHTS_SHA256_TAG, sha256_file(weights))
        assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={exported.out}", f"trial={best.number}",
                     "out=infinite", "name=tiny-infinite"]) == 2
        assert (f"trial: trial {best.number}'s saved weights hold NaN or infinite values in {name}"
                in capsys.readouterr().err)
        assert not (exported.root / "infinite").exists()
        assert not client.search_registered_models("name = 'tiny-infinite'")
    finally:
        weights.write_bytes(original)
        client.set_tag(run.info.run_id, WEIGHTS_SHA256_TAG, recorded)


@pytest.mark.slow
def test_export_refuses_bad_input_and_writes_nothing(exported, monkeypatch, capsys):
    monkeypatch.chdir(exported.root)
    (exported.root / "afile").touch()
    before = sorted(p.name for p in exported.root.iterdir())
    out = exported.out
    for args, key in ([["study.name=nope"], "no study database"],
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", "trial=999", "out=x1"], "trial 999"],
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", "trial=pareto:7", "out=x2"], "pareto"],
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={exported.model_dir}"],
                       "not empty"],
                      # an empty file was said to be "not empty": it is a file, not a folder
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", "out=afile"], "out: afile is a file, not a "
                       "folder"],
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", "retrain=maybe", "out=x3"], "retrain"],
                      # 0 exported an untrained model as the champion; nan and inf ended in a traceback
                      *[[["study.name=tiny-clusters", f"hydra.run.dir={out}", "retrain=true", f"retrain_factor={f}",
                          "out=x4"], "retrain_factor: expected a number > 0 and at most 1000"]
                        for f in ("0", "-1", "nan", "inf", "1001", "1e17")],
                      *[[["study.name=tiny-clusters", f"hydra.run.dir={out}", f"trial=fastest_within:{pct}", "out=x5"],
                         "finite percentage"] for pct in ("nan", "-500")],
                      # MLflow refused the name only after the whole folder was written
                      [["study.name=tiny-clusters", f"hydra.run.dir={out}", "name=a/b", "out=x6"], "name: 'a/b'"]):
        assert main(["export", *args]) == 2
        assert key in capsys.readouterr().err
    assert sorted(p.name for p in exported.root.iterdir()) == before


def test_export_from_a_study_that_cannot_be_written_is_refused_before_its_work(exported, tmp_path, monkeypatch,
                                                                               capsys):
    """The export registers the model in the study's MLflow database: on a read-only study folder it
    used to evaluate, measure and write the whole export folder, then fail registering it."""
    from .helpers import read_only_copy

    monkeypatch.chdir(tmp_path)
    with read_only_copy(exported.out, tmp_path / "ro") as out:
        code = main(["export", "study.name=tiny-clusters", f"hydra.run.dir={out}", f"out={tmp_path / 'model'}"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"tracking.uri: cannot write to {out / 'mlflow.db'}: it is read-only" in err and err.count("\n") == 2
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_retrain_exports_a_longer_trained_model(exported, monkeypatch):
    monkeypatch.chdir(exported.root)
    target = exported.root / "retrained"
    assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={exported.out}", "trial=0", "retrain=true",
                 "retrain_factor=2", f"out={target}", "name=tiny-retrained"]) == 0
    metrics = json.loads((target / "metrics.json").read_text())
    assert metrics["retrained"] is True and metrics["retrain_steps"] > 0
    assert fulu_nas.load(target).arch.to_dict() == exported.study.trials[0].user_attrs["arch"]


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["diverges", "capped", "nan_weights"])
def test_a_retraining_that_fails_exports_and_registers_nothing(exported, monkeypatch, capsys, outcome):
    """A retraining that diverged ended the export in a traceback; one whose loss checks passed but
    whose weights hold NaN (a check reads the loss every report_every steps) was exported and registered
    as the champion, which fulu_nas.load then refused."""
    import mlflow

    from fulu_nas.search import export_trial
    from fulu_nas.training.train import BudgetCapReached, TrainingDiverged

    trained = export_trial.train_architecture
    poisoned = []

    def failing(*args, **kwargs):
        model, result = trained(*args, **kwargs)
        if outcome == "diverges":
            raise TrainingDiverged(7, float("nan"), "not finite")
        if outcome == "capped":
            raise BudgetCapReached(30, 240, 61.0, 60.0)
        name, weight = next((n, p) for n, p in model.named_parameters() if "experts" in n)
        with torch.no_grad():
            weight.view(-1)[0] = float("nan")
        poisoned.append(name)
        return model, result

    monkeypatch.setattr(export_trial, "train_architecture", failing)
    monkeypatch.chdir(exported.root)
    client = mlflow.MlflowClient(f"sqlite:///{exported.out / 'mlflow.db'}")
    name = f"tiny-failed-{outcome}"
    code = main(["export", "study.name=tiny-clusters", f"hydra.run.dir={exported.out}", "trial=0", "retrain=true",
                 f"out={exported.root / name}", f"name={name}"])
    err = capsys.readouterr().err
    assert code == 2, err
    expected = {"diverges": "retrain: retraining trial 0 diverged: training diverged at step 7",
                "capped": "retrain: retraining trial 0 stopped: safety cap of 60 s reached after 30 of 240 steps",
                "nan_weights": f"retrain: retraining trial 0 left NaN or infinite values in {poisoned and poisoned[0]}"}
    problems = err.split("error: cannot export:\n")[-1]
    assert expected[outcome] in problems and problems.count("\n") == 1, err
    assert not (exported.root / name).exists()
    assert not client.search_registered_models(f"name = '{name}'")


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_retraining_at_the_searchs_budget_reproduces_the_trial(ranks, tmp_path, monkeypatch):
    """The retraining trains the configuration the search measured, over trainer.expert_parallel ranks
    (batch_size per rank): at factor 1 and the trial's seed it gives the trial's model again."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=1", "trainer.steps=20", f"trainer.expert_parallel={ranks}") == 0
    assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={out}", "trial=0", "retrain=true",
                 "retrain_factor=1", f"out={tmp_path / 'model'}"]) == 0
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert metrics["retrained"] is True and metrics["retrain_steps"] == 20
    assert metrics["loss"] == load_study(out).trials[0].values[0]
    assert not list(out.glob("ep-trial-*"))  # the ranks' scratch folder is gone



@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine must lack the GPU the study trained with")
def test_a_study_searched_with_cuda_graphs_is_read_anywhere_and_trained_again_only_where_it_can(exported, tmp_path,
                                                                                                 monkeypatch, capsys):
    """A study searched on a GPU with trainer.cuda_graph=true: its dashboard and an export of its saved
    weights were refused on a machine without CUDA once the settings checked the training step; a
    retraining or a confirmation, which would train here, still are."""
    study = tmp_path / "study"
    shutil.copytree(exported.out, study)
    config_file = study / "search_config.json"
    data = json.loads(config_file.read_text())
    data["config"]["trainer"]["cuda_graph"] = True
    config_file.write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    where = ["study.name=tiny-clusters", f"hydra.run.dir={study}"]
    assert main(["export", *where, f"out={tmp_path / 'model'}"]) == 0
    assert main(["dashboard", *where, f"out={tmp_path / 'page.html'}"]) == 0
    capsys.readouterr()
    assert main(["export", *where, "retrain=true", f"out={tmp_path / 'again'}"]) == 2
    assert "trainer.cuda_graph" in capsys.readouterr().err
    assert main(["confirm", *where, "top_k=1", "seeds=1"]) == 2
    assert "trainer.cuda_graph" in capsys.readouterr().err

def fake_study(directions, rows):
    study = optuna.create_study(directions=directions)
    for values, loss, latency in rows:
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={"metrics": {"loss": loss,
                                                                                         "latency_ms": latency}}))
    return study


def settings_for(objectives, directions):
    return SimpleNamespace(study=SimpleNamespace(name="s", objectives=objectives, directions=directions,
                                                 multi_objective=len(objectives) > 1))


def test_trial_selection_rules():
    single = fake_study(["minimize"], [([2.0], 2.0, 1.0), ([1.0], 1.0, 5.0), ([1.5], 1.5, 0.5)])
    s = settings_for(["loss"], ["minimize"])
    assert select_trial(single, s, "best").number == 1
    assert select_trial(single, s, "2").number == 2
    assert select_trial(single, s, "fastest_within:60").number == 2
    assert select_trial(single, s, "fastest_within:10").number == 1

    multi = fake_study(["minimize", "minimize"], [([1.0, 5.0], 1.0, 5.0), ([2.0, 1.0], 2.0, 1.0),
                                                  ([3.0, 3.0], 3.0, 3.0)])
    m = settings_for(["loss", "latency_ms"], ["minimize", "minimize"])
    with pytest.raises(FuluConfigError, match="pareto"):
        select_trial(multi, m, "best")
    assert [select_trial(multi, m, f"pareto:{i}").number for i in range(2)] == [0, 1]
    with pytest.raises(FuluConfigError, match="0..1"):
        select_trial(multi, m, "pareto:2")
    with pytest.raises(FuluConfigError, match="expected best"):
        select_trial(multi, m, "latest")


def test_a_reused_result_is_one_point_of_the_pareto_front(tmp_path):
    """A trial that reuses an identical architecture's result has its values, so Optuna puts both on
    the front: the summary, the progress line and export's pareto:<i> counted the architecture twice."""
    from fulu_nas.search.report import summarize
    from fulu_nas.search.study import TrialProgress

    study = optuna.create_study(directions=["minimize", "minimize"])
    for values, arch, extra in [([1.0, 5.0], "a", {}), ([2.0, 1.0], "b", {}), ([1.0, 5.0], "a", {"cached_from": 0}),
                                ([3.0, 3.0], "c", {})]:
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs={"arch_hash": arch, **extra}))
    assert len(study.best_trials) == 3  # Optuna's front holds the copy
    m = SimpleNamespace(study=SimpleNamespace(name="s", objectives=["loss", "latency_ms"],
                                              directions=["minimize", "minimize"], multi_objective=True,
                                              n_trials=4))
    assert [row["number"] for row in summarize(study, m)["pareto_front"]] == [0, 1]
    assert [select_trial(study, m, f"pareto:{i}").number for i in range(2)] == [0, 1]
    with pytest.raises(FuluConfigError, match=r"pareto:<i> needs i in 0..1"):
        select_trial(study, m, "pareto:2")
    assert TrialProgress(m, study, enabled=False).best == "Pareto front: 2 trials"


def test_an_export_into_a_file_names_it_a_file_and_writes_nothing(tmp_path):
    """An empty file given as out= was said to "exist and not be empty"."""
    from fulu_nas.deploy.export import assemble

    (tmp_path / "afile").touch()
    with pytest.raises(FuluConfigError, match=r"out: .*afile is a file, not a folder; choose a folder") as e:
        assemble(tmp_path / "afile", lambda folder: (folder / "x").write_text("x"))
    assert len(e.value.problems) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and (tmp_path / "afile").read_bytes() == b""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").touch()
    with pytest.raises(FuluConfigError, match=r"out: .*full exists and is not empty; choose another folder"):
        assemble(tmp_path / "full", lambda folder: None)


@pytest.fixture(scope="module")
def short_export(tmp_path_factory):
    """A model of 8 tokens at most written as `fulu-nas export` writes one, with a metric that does not apply
    (NaN) and a count measured as a float (no search needed)."""
    from fulu_nas.deploy.export import FORMAT_VERSION, write_export
    from fulu_nas.models import ArchConfig, PiMoETransformer
    from fulu_nas.moe import MoEConfig

    arch = ArchConfig(vocab_size=24, max_seq_len=8, num_layers=1, hidden_size=32, num_heads=4,
                      moe=MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("short") / "model"
    write_export(folder, PiMoETransformer(arch).eval(), {"format": FORMAT_VERSION, "architecture": arch.to_dict()},
                 {"loss": 1.25, "active_params": 11812.0, "load_balance": float("nan")}, "# short\n")
    return folder


def test_the_cards_torch_only_lines_run_for_a_model_shorter_than_16_tokens(short_export):
    """The card's example batch was (2, 16) whatever the model's length: a model of 8 tokens failed it
    ("Guard failed: tokens_BS.size()[1] <= 8")."""
    assert tuple(run_card_snippet(short_export)["logits"].shape) == (2, 8, 24)


def test_a_model_of_one_token_is_exported_and_its_program_runs(tmp_path):
    """The program's sequence dimension was dynamic from 1 to max_seq_len: for a model of one token torch
    refused it ("Cannot create Dim with inconsistent min=1, max=1") after the search had finished."""
    from fulu_nas.deploy.export import FORMAT_VERSION, write_export
    from fulu_nas.models import ArchConfig, PiMoETransformer
    from fulu_nas.moe import MoEConfig

    arch = ArchConfig(vocab_size=24, max_seq_len=1, num_layers=1, hidden_size=32, num_heads=4,
                      moe=MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32))
    torch.manual_seed(0)
    model = PiMoETransformer(arch).eval()
    folder = tmp_path / "model"
    write_export(folder, model, {"format": FORMAT_VERSION, "architecture": arch.to_dict()}, {"loss": 1.0}, "# one\n")
    program = torch.export.load(str(folder / "model.pt2"))
    x = torch.tensor([[3], [7], [11]])
    torch.testing.assert_close(program.module()(x), model(x).logits)
    assert tuple(run_card_snippet(folder)["logits"].shape) == (2, 1, 24)


def test_metrics_json_is_strict_json(short_export):
    """A metric that does not apply (NaN) was written as NaN, which no strict JSON parser reads: it is null."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    metrics = json.loads((short_export / "metrics.json").read_text(), parse_constant=refuse)
    assert metrics == {"loss": 1.25, "active_params": 11812.0, "load_balance": None}


@pytest.mark.slow
def test_the_card_says_whose_weights_and_prints_counts_as_integers(exported):
    card = (exported.model_dir / "README.md").read_text()
    assert "Weights are the trial's own, saved during the search." in card
    metrics = json.loads((exported.model_dir / "metrics.json").read_text())
    assert f"| active_params | {int(metrics['active_params'])} |" in card  # 1.181e+04 for 11812
    assert "e+0" not in card and "| nan |" not in card


def sqlite_tables(path: Path) -> list[str]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))


@pytest.mark.slow
def test_serving_from_a_database_that_is_not_mlflows_is_refused_and_writes_nothing(exported, tmp_path, monkeypatch,
                                                                                   capsys):
    """The study's optuna.db as the registry: MLflow made its tables in it, then failed with an alembic
    traceback (exit 1). Any SQLite file that is not an MLflow database is one message, exit 2, untouched."""
    from fulu_nas.deploy.serve import load_pyfunc

    study_db = exported.out / "optuna.db"
    empty = tmp_path / "empty.db"
    empty.touch()
    before = sqlite_tables(study_db)
    champion = "models:/tiny-clusters@champion"
    for database, words in ((study_db, "is an Optuna study database, not an MLflow one"),
                            (empty, "is not an MLflow tracking database")):
        uri = f"sqlite:///{database}"
        assert main(["serve", champion, "--tracking-uri", uri, "--port", str(free_port())]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: tracking URI: ") and words in err and err.count("\n") == 1, err
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert main(["serve", champion, "--port", str(free_port())]) == 2
        assert words in capsys.readouterr().err
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        with pytest.raises(FuluConfigError, match=words):
            load_pyfunc(champion, tracking_uri=uri)
    assert sqlite_tables(study_db) == before and empty.stat().st_size == 0


@pytest.mark.slow
def test_export_with_a_tracking_database_that_is_missing_or_lacks_the_trials_run_is_refused(exported, tmp_path,
                                                                                           monkeypatch, capsys):
    """A tracking.uri naming no database ended in a traceback ('Run with id=... not found', exit 1) and left a
    new, empty MLflow database behind; one without the trial's run did the same."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "new.db"
    other = tmp_path / "other.db"
    mlflow.MlflowClient(f"sqlite:///{other}").search_experiments()  # an MLflow database of no search
    for database, words in ((missing, "no such database"), (other, "is not in")):
        assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={exported.out}", "out=w",
                     f"tracking.uri=sqlite:///{database}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot export:\n  - tracking.uri: ") and err.count("\n") == 2, err
        assert words in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


@pytest.mark.slow
def test_a_folder_is_served_by_fulu_nas_code_so_code_added_with_its_checksums_never_runs(exported, tmp_path,
                                                                                      monkeypatch):
    """A folder's pyfunc.py changed along with checksums.json ran in load_pyfunc and fulu-nas serve when no
    fingerprint was given. A folder's own code is never run: its checked program and configuration are
    served by the installed fulu-nas pyfunc."""
    from fulu_nas.deploy.export import PYFUNC_CODE
    from fulu_nas.deploy.serve import load_pyfunc
    from fulu_nas.search import serve_command

    evil = tmp_path / "evil"
    shutil.copytree(exported.model_dir, evil)
    marker = tmp_path / "code-ran"
    for name in ("pyfunc.py", "code/pt2_check.py"):
        with open(evil / name, "a") as f:
            f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    forge_checksums(evil)
    expected = fulu_nas.load(exported.model_dir)(torch.tensor([[1, 2]])).logits.detach().numpy()
    np.testing.assert_allclose(load_pyfunc(evil).predict(np.array([[1, 2]])), expected, rtol=1e-5, atol=1e-5)
    served = []
    monkeypatch.setattr(serve_command, "run_server",
                        lambda command, **_: served.append((Path(command[3]) / "pyfunc.py").read_text()) or 0)
    assert main(["serve", str(evil), "--port", str(free_port())]) == 0
    assert served == [PYFUNC_CODE.read_text()] and not marker.exists()


@pytest.mark.slow
def test_refusals_name_the_problem_as_the_user_gave_it(exported, tmp_path, capsys):
    """A file was 'no such folder'; a bad --sha256 was named expected_sha256; an unlisted upcycling.yaml added
    to a searched export made it 'an upcycled encoder'; fulu_nas.load(None) was a bare TypeError."""
    folder = exported.model_dir
    port = str(free_port())
    assert main(["serve", str(folder / "MLmodel"), "--port", port]) == 2
    assert capsys.readouterr().err == f"error: {folder / 'MLmodel'}: not an export directory (a file, not a folder)\n"
    with pytest.raises(FuluConfigError, match=r"config.yaml: not an export directory \(a file, not a folder\)"):
        fulu_nas.load(folder / "config.yaml")
    assert main(["serve", str(folder), "--sha256", "abc", "--port", port]) == 2
    assert capsys.readouterr().err.startswith("error: --sha256: 'abc' is not a SHA-256")
    added = tmp_path / "added"
    shutil.copytree(folder, added)
    (added / "upcycling.yaml").write_text("format: 1\n")
    assert main(["serve", str(added), "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"{added / 'upcycling.yaml'}: not listed in checksums.json" in err and "upcycled" not in err, err
    with pytest.raises(FuluConfigError, match="upcycling.yaml: not listed in checksums.json") as raised:
        fulu_nas.load(added)
    assert "config.json" not in str(raised.value)
    for value in (None, 3, b"model"):
        with pytest.raises(FuluConfigError, match=f"^directory: {re.escape(repr(value))} is not a folder"):
            fulu_nas.load(value)
