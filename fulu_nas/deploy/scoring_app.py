"""The HTTP server of ``fulu-nas serve``: MLflow's scoring app (``/invocations``, ``/ping``, ``/health``,
``/version``) for the checked copy of a model, run by uvicorn behind :class:`ShortErrors`.

MLflow's app answers a few requests with a plain-text 500 and a traceback on the server's console (an
integer past Python's 4,300 digits, JSON nested past the recursion limit, a POST without a Content-Type),
and its 400s carry the server's stack trace and echo the whole request (megabytes for a large one). Here
every error answer is JSON, ``error_code`` and a ``message`` of at most :data:`MAX_MESSAGE` characters,
and a request that fails inside the server is one line on the console.

Run as ``python -m fulu_nas.deploy.scoring_app MODEL --host H --port P --shown NAME``: it takes the port
first (one message and exit 2 when it cannot), loads the model, says where it serves once it answers
there, and serves until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from .server_process import listen_on, listen_problem, port

MAX_MESSAGE = 400
GRACEFUL_S = 5  # for the requests under way when the server is stopped
BODY_S = 60  # for a request's body to arrive (MLflow's own limit on a request)
# A request's body, at most: the model's largest batch of its largest ids, each with this many bytes more for
# separators and indentation (one id a line, indented four levels by four spaces: 18), plus this much for the
# rest of the JSON.
ID_ROOM = 32
BODY_SLACK = 1 << 20
# MLflow's wrappers around the message that says what is wrong: the request echoed before it, or after it.
_ECHOED_BEFORE = re.compile(r"^Failed to predict data '.*'\.\s*\nError: ", re.S)
_ECHOED_AFTER = re.compile(r"\nInput: \n.*$", re.S)

# MLflow's input forms other than "inputs", refused with the reason: "instances" drops an instance without
# token_ids and answers for the others; the DataFrame forms fail on the model's tensor signature, with a
# message that echoes the request.
REFUSED_FORMS = {
    "instances": 'the "instances" form loses an instance that has no token_ids',
    "dataframe_split": "a DataFrame's rows of token ids do not fit the model's tensor input",
    "dataframe_records": "a DataFrame's rows of token ids do not fit the model's tensor input",
}

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def short_message(text: str) -> str:
    """An error's message without the request MLflow echoes in it, cut to :data:`MAX_MESSAGE` characters."""
    text = _ECHOED_AFTER.sub("", _ECHOED_BEFORE.sub("", text)).strip()
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


def error_answer(status: int, body: bytes) -> dict[str, str]:
    """The answer for MLflow's error answer ``body`` (JSON, or plain text): its error code and its message,
    short, without ``stack_trace``."""
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        answer = {"message": body.decode("utf-8", "replace")}
    code = answer.get("error_code") or ("INTERNAL_ERROR" if status >= 500 else "BAD_REQUEST")
    # FastAPI's own answers (404, 405) say it in "detail"
    return {"error_code": str(code), "message": short_message(str(answer.get("message") or answer.get("detail") or ""))}


class ShortErrors:
    """ASGI middleware: answers of status 400 and above are rewritten by :func:`error_answer`; an exception
    out of the app is an answer too (400 for input Python cannot read, else 500), logged in one line; a
    POST without a Content-Type is refused before MLflow's app reads it (it fails on it), and so are the input
    forms of :data:`REFUSED_FORMS`."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_body: int | None = None):
        self.app = app
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "POST" and not any(name.lower() == b"content-type" for name, _ in scope["headers"]):
            await _answer(send, 415, {"error_code": "BAD_REQUEST",
                                      "message": "no Content-Type: send the input as application/json"})
            return
        if scope["method"] == "POST":
            try:
                body, disconnected = await asyncio.wait_for(
                    _read_body(receive, self.max_body, _declared_length(scope)), BODY_S)
            except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
                await _answer(send, 408, {"error_code": "BAD_REQUEST",
                                          "message": f"the request's body did not arrive within {BODY_S} s"})
                return
            except BodyTooLarge:
                await _answer(send, 413, {"error_code": "BAD_REQUEST", "message": (
                    f"the request's body is larger than this model's largest input needs ({self.max_body:,} "
                    "bytes); send at most its largest batch, or split it")})
                return
            if disconnected:
                return  # nobody to answer
            if form := _refused_form(body):
                await _answer(send, 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": (
                    f'send the token ids as {{"inputs": [[ids], ...]}}: {REFUSED_FORMS[form]}')})
                return
            receive = _replay(body, receive)
        started: list[Message] = []
        held: list[bytes] = []

        async def hold_errors(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.append(message)
            if started and started[0]["status"] >= 400:
                held.append(message.get("body", b""))
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_errors)
        except Exception as e:  # noqa: BLE001 - every failure is an answer, never a traceback on the console
            if started and started[0]["status"] < 400:
                return  # the answer is under way
            readable = isinstance(e, (ValueError, RecursionError))  # a number too long, JSON nested too deep
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"serve: {scope['method']} {scope['path']} failed ({short_message(problem)})", file=sys.stderr,
                  flush=True)
            await _answer(send, 400 if readable else 500,
                          {"error_code": "BAD_REQUEST" if readable else "INTERNAL_ERROR",
                           "message": short_message(f"the request could not be read ({problem})" if readable
                                                    else f"the server failed on this request ({problem})")})
            return
        if started and started[0]["status"] >= 400:
            # its headers but the body's own (an answer 405's allow, say)
            kept = [(k, v) for k, v in started[0].get("headers", []) if k.lower() not in (b"content-type",
                                                                                        b"content-length")]
            await _answer(send, started[0]["status"], error_answer(started[0]["status"], b"".join(held)), kept)


class BodyTooLarge(Exception):
    """A request's body passed :class:`ShortErrors`'s ``max_body``."""


def body_limit(config: dict[str, Any]) -> int | None:
    """The largest body a request to the model of pyfunc ``config`` (its ``max_batch``, ``max_seq_len`` and
    ``vocab_size``) needs, with room for JSON's separators and indentation; None where the config lacks them.
    A larger one is refused before it is read whole: held, joined and parsed, a body takes several times its
    size in memory, and a few gigabytes from any client would end the server."""
    try:
        ids = int(config["max_batch"]) * int(config["max_seq_len"])
        digits = len(str(int(config["vocab_size"])))
    except (KeyError, TypeError, ValueError):
        return None
    return BODY_SLACK + ids * (digits + ID_ROOM)


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, where it has a readable one."""
    for name, value in scope["headers"]:
        if name.lower() == b"content-length" and value.strip().isdigit():
            return int(value)
    return None


async def _read_body(receive: Receive, max_body: int | None = None,
                     declared: int | None = None) -> tuple[bytes, bool]:
    """The request's whole body, and whether the client went away before it ended; BodyTooLarge once it is
    declared or read past ``max_body``."""
    if max_body is not None and declared is not None and declared > max_body:
        raise BodyTooLarge
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if max_body is not None and size > max_body:  # chunked, or longer than its Content-Length said
            raise BodyTooLarge
        if not message.get("more_body"):
            return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the app the body already read, then the client's own (its disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _refused_form(body: bytes) -> str | None:
    """Which of :data:`REFUSED_FORMS` the JSON object ``body`` is in, if any (a cheap look before a full parse)."""
    if not any(f'"{form}"'.encode() in body for form in REFUSED_FORMS):
        return None
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None  # MLflow's answer names what is wrong
    return next((form for form in REFUSED_FORMS if isinstance(value, dict) and form in value), None)


async def _answer(send: Send, status: int, answer: dict[str, str], headers: list | None = None) -> None:
    body = json.dumps(answer).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [*(headers or []), (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fulu_nas.deploy.scoring_app")
    parser.add_argument("model", help="the MLflow model to serve (fulu-nas serve's checked copy)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=5001)
    parser.add_argument("--shown", help="the model as the user named it, for the line that says where it serves")
    args = parser.parse_args(argv)
    try:  # before the model loads: a port taken since fulu-nas serve checked it is one message, not a traceback
        listening = listen_on(args.host, args.port)
    except OSError as e:
        print(f"error: {listen_problem(args.host, args.port, e)}", file=sys.stderr)
        return 2

    import uvicorn
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(args.model)
    app = ShortErrors(scoring_server.init(model), body_limit(model.model_config or {}))
    # MLflow's warnings while serving are about a request ("If using `instances` as input key ..."), which
    # its answer tells the client; the console is the operator's.
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    # uvicorn's warnings are about a client's bytes (a malformed request, a websocket upgrade, which this server
    # does not take); a stop waits for the requests under way, a few seconds at most.
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False, ws="none",
                                           timeout_graceful_shutdown=GRACEFUL_S))
    # The port listens and the model is loaded: a request sent on reading this line is answered.
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {args.shown or args.model} (every file checked) at http://{host}:{args.port}/invocations  "
          "(Ctrl-C stops it)", flush=True)
    server.run(sockets=[listening])
    return 0


if __name__ == "__main__":
    sys.exit(main())
