"""``fulu-nas serve`` as a client and an operator meet it: every error answer short JSON without a stack
trace, the console the command's own lines, the address printed once it answers, a port taken late or a
SIGTERM during the checks handled like the other bad input and interrupts, and a configuration that does
not describe the served program refused."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fulu_nas.errors import FuluConfigError

from .helpers import free_port
from .test_export import exported, forge_checksums  # noqa: F401 - the module's exported study and model

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def server(model: Path, tmp_path: Path):
    """``fulu-nas serve model`` on a free port, its console in files; yields (port, the console's stdout, its
    stderr), once the address line is printed."""
    port = free_port()
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "fulu_nas", "serve", str(model), "--port", str(port)],
                                   stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        deadline = time.time() + 120
        while "serving" not in out.read_text():
            assert process.poll() is None, err.read_text()
            assert time.time() < deadline, "no address line"
            time.sleep(0.2)
        yield port, out, err
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def request(port: int, body: bytes, headers: dict[str, str] | None = None, method: str = "POST",
            path: str = "/invocations") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json"} if headers is None else headers)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def test_every_error_answer_is_short_json_and_the_console_carries_no_traceback(exported, tmp_path):  # noqa: F811
    """MLflow's scoring server answered three of these with a plain-text 500 and a 95-line traceback on the
    serve console (a 4,301-digit integer, JSON nested 100,000 deep, a POST without a Content-Type), CSV with a
    400 holding the server's stack trace, and a 5 MB malformed body with a 5 MB error echoing it."""
    import fulu_nas

    with server(exported.model_dir, tmp_path) as (port, out, err):
        # the address line comes once the server answers there
        assert request(port, b"", method="GET", path="/ping")[0] == 200
        cases = {
            "a 4,301-digit id": (b'{"inputs": [[' + b"9" * 4301 + b", 2]]}", None, 400),
            "nested 100,000 deep": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, 400),
            "no Content-Type": (b'{"inputs": [[1, 2]]}', {}, 415),
            "CSV": (b"token_ids\n1\n2\n", {"Content-Type": "text/csv"}, 400),
            "1.5 MB of malformed JSON": (b'{"inputs": [[1, 2' + b" " * 1_500_000, None, 400),
            # past what the model's largest input needs (a few GB held the server's memory several times over)
            "5 MB of a request": (b'{"inputs": [[1, 2]]' + b" " * 5_000_000 + b"}", None, 413),
            "a 1 MB string id": (json.dumps({"inputs": [["A" * 1_000_000, 1]]}).encode(), None, 400),
        }
        for name, (body, headers, status) in cases.items():
            got, answer = request(port, body, headers)
            assert got == status, (name, got, answer[:300])
            error = json.loads(answer)
            assert set(error) == {"error_code", "message"} and len(answer) < 600, (name, answer[:300])
        assert "expected integer token ids, got 'AAAA" in json.loads(request(port, *cases["a 1 MB string id"][:2])[1])[
            "message"]
        # a ragged batch: MLflow hands it over as an object array of rows ("got shape (2,)")
        assert json.loads(request(port, b'{"inputs": [[1, 2, 3], [1]]}')[1])["message"] == \
            "tokens: expected shape (batch, seq), got rows of different lengths"
        # the DataFrame forms: MLflow's schema error echoed the request, for any batch of token ids
        for body in (b'{"dataframe_split": {"columns": ["token_ids"], "data": [[[1, 2, 3]], [[1]]]}}',
                     b'{"dataframe_records": [{"token_ids": [1, 2, 3]}]}'):
            got, answer = request(port, body)
            assert got == 400 and json.loads(answer)["message"] == (
                'send the token ids as {"inputs": [[ids], ...]}: a DataFrame\'s rows of token ids do not fit the '
                "model's tensor input"), answer
        assert "larger than this model's largest input needs (3,276,800 bytes)" in json.loads(
            request(port, cases["5 MB of a request"][0])[1])["message"]
        # the largest batch of the largest ids, one id a line, in either form: within the limit
        for form in ({"inputs": [[23] * 16] * 4096}, {"inputs": {"token_ids": [[23] * 16] * 4096}}):
            largest = json.dumps(form, indent=4).encode()
            assert len(largest) > 1_000_000 and request(port, largest)[0] == 200
        # and it serves on
        status, answer = request(port, json.dumps({"inputs": [[1, 2]]}).encode())
        expected = fulu_nas.load(exported.model_dir)(torch.tensor([[1, 2]])).logits.detach().numpy()
        assert status == 200
        np.testing.assert_allclose(np.asarray(json.loads(answer)["predictions"]), expected, rtol=1e-5, atol=1e-5)
        console = out.read_text() + err.read_text()
    assert "Traceback" not in console, console
    # the address, and a line for each request the server failed on (none: each was bad input)
    assert out.read_text().splitlines() == [
        f"serving {exported.model_dir} (every file checked) at http://127.0.0.1:{port}/invocations  (Ctrl-C stops it)"]
    for noise in ("INFO", "Downloading artifacts", "WARNING", "If using"):
        assert noise not in console, console


def test_a_port_taken_after_the_check_is_one_message(exported):  # noqa: F811
    """Two fulu-nas serve started at once on one port both passed the check: the second printed its address,
    then MLflow's 30-line traceback, exit 1. The server takes the port before it loads the model."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "fulu_nas.deploy.scoring_app", str(exported.model_dir),
                               "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done
    assert done.stderr == f"error: --port: cannot listen on 127.0.0.1:{port} (Address already in use)\n"


def test_a_sigterm_while_the_model_is_checked_removes_its_private_copy(exported, tmp_path):  # noqa: F811
    """SIGTERM before the server ran ended the command at once (exit 143, no word) with two copies of the
    model left in the temporary folder; Ctrl-C there removed them. SIGTERM now does what Ctrl-C does."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "fulu_nas", "serve", str(exported.model_dir), "--port",
                                str(free_port())], env={**os.environ, "TMPDIR": str(tmp)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp.glob("fulu-nas-serve-*/checked")):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert (process.returncode, stdout, stderr) == (130, "", "interrupted\n")
    assert not list(tmp.glob("fulu-nas-serve-*"))


@pytest.mark.parametrize("field, value", [("vocab_size", 1000), ("max_seq_len", 64)])
def test_a_configuration_that_does_not_describe_the_program_is_refused(exported, tmp_path, field, value):  # noqa: F811
    """config.yaml edited with its checksums: served with the edited limits, a request inside them reached the
    program, which failed (400 with its stack trace); fulu_nas.load refused the folder."""
    from fulu_nas.deploy.serve import checked_model

    folder = tmp_path / "edited"
    shutil.copytree(exported.model_dir, folder)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["architecture"][field] = value
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    forge_checksums(folder)
    with pytest.raises(FuluConfigError) as raised:
        with checked_model(folder):
            pass
    message = str(raised.value)
    assert message.startswith(f"{folder / 'config.yaml'} does not describe the program model.pt2: ") and \
        "\n" not in message, message
    assert ("embed.weight" if field == "vocab_size" else "pos.weight") in message


def test_a_program_failure_is_a_short_error(exported):  # noqa: F811
    """Whatever the program raises reaches the client as one short message, not its traceback."""
    import mlflow
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(str(exported.model_dir))
    inner = model.unwrap_python_model()
    inner.vocab_size += 10  # limits the program does not have
    with pytest.raises(MlflowException) as raised:
        model.predict(np.array([[inner.vocab_size - 1, 0]], dtype=object))
    message = raised.value.message
    assert message.startswith("the model's program failed on this input (") and len(message) < 300, message
    assert raised.value.error_code == "INTERNAL_ERROR"


def asgi(app, method: str = "POST", body_parts: list[bytes] | None = None, headers=((b"content-type",
                                                                                   b"application/json"),)):
    """One request through the ASGI ``app``: its body in ``body_parts`` (None: a body that never ends); the
    answer's status, headers and JSON."""
    import asyncio

    parts = list(body_parts) if body_parts is not None else None
    sent: list[dict] = []

    async def receive():
        if parts is None:
            await asyncio.Event().wait()
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/invocations", "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], dict(start["headers"]), json.loads(body)


def fastapi_answer(status: int, detail: str, extra_headers=()):
    async def app(scope, receive, send):
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *extra_headers]})
        await send({"type": "http.response.body", "body": body})
    return app


def test_the_web_frameworks_own_errors_keep_their_words_and_headers():
    """404 and 405 answered {"error_code": "BAD_REQUEST", "message": ""}: FastAPI says it in "detail"; the
    405 lost its allow header."""
    from fulu_nas.deploy.scoring_app import ShortErrors

    status, headers, answer = asgi(ShortErrors(fastapi_answer(405, "Method Not Allowed", [(b"allow", b"POST")])),
                                   method="GET")
    assert (status, headers[b"allow"], answer) == (405, b"POST", {"error_code": "BAD_REQUEST",
                                                                  "message": "Method Not Allowed"})


def test_the_instances_form_is_refused_and_a_body_that_never_ends_gets_408(monkeypatch):
    """MLflow's "instances" form dropped an instance without token_ids and answered 200 with fewer predictions
    than instances; a body that never ended got uvicorn's plain-text 500 after MLflow's 60 s."""
    from fulu_nas.deploy import scoring_app

    called = []

    async def app(scope, receive, send):
        called.append(await receive())
        await fastapi_answer(200, "ok")(scope, receive, send)

    guarded = scoring_app.ShortErrors(app)
    status, _, answer = asgi(guarded, body_parts=[b'{"instances": [{"token_ids": [1, 2]}, ', b'{"x": 1}]}'])
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE" and '"inputs"' in answer["message"]
    assert not called
    status, _, _ = asgi(guarded, body_parts=[b'{"inputs": ', b"[[1, 2]]}"])  # read whole, and given to the app
    assert status == 200 and called == [{"type": "http.request", "body": b'{"inputs": [[1, 2]]}', "more_body": False}]
    monkeypatch.setattr(scoring_app, "BODY_S", 0.2)
    assert asgi(guarded, body_parts=None)[:1] == (408,)


def test_a_body_past_the_models_largest_input_is_refused_before_it_is_read_whole():
    """A body was read whole, joined, replayed and parsed: 500 MB took the server from 0.6 to 2.1 GB, and a
    few GB from any client would end it. Past the bound of the model's largest input it gets 413, from its
    Content-Length or, sent in chunks, once that many bytes came."""
    from fulu_nas.deploy import scoring_app

    limit = scoring_app.body_limit({"max_batch": 4096, "max_seq_len": 16, "vocab_size": 24})
    assert limit == scoring_app.BODY_SLACK + 4096 * 16 * (2 + scoring_app.ID_ROOM)
    assert scoring_app.body_limit({"vocab_size": 24}) is None  # not a fulu-nas model's config: no bound
    called = []

    async def app(scope, receive, send):
        called.append(await receive())
        await fastapi_answer(200, "ok")(scope, receive, send)

    guarded = scoring_app.ShortErrors(app, max_body=100)
    json_type = (b"content-type", b"application/json")
    for parts, headers in (([b"x" * 60, b"x" * 41], (json_type,)),  # chunked: counted as it comes
                           ([b"x" * 10], (json_type, (b"content-length", b"101"))),  # declared: before any read
                           ([b"x" * 101], (json_type,))):
        status, _, answer = asgi(guarded, body_parts=parts, headers=headers)
        assert status == 413 and "larger than this model's largest input needs (100 bytes)" in answer["message"]
    assert not called
    assert asgi(guarded, body_parts=[b"x" * 50, b"x" * 50])[0] == 200 and called[0]["body"] == b"x" * 100
