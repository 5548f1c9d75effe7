"""client.rest against a local HTTP server that records what it got: the multipart body
round-trips byte for byte, status codes and bodies come back as sent, tokens and their refresh,
raw bodies, no answer at all, gevent (Locust) cooperation, and the Locust REST user's events."""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from client.morph_client import build_input
from loadtest.profiles import load_profile
from client.rest import RestClient, RestError, RestNoAnswer, encode_multipart, token_refused
from morph_protocol import wire
from morph_protocol.keyfile import TokenSource
from tests.conftest import REPO_ROOT

IMAGE = bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\n\x00"  # binary, with CRLFs and dashes


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeServer:
    """Answers each POST with `reply(received) -> (status, content_type, body)`."""

    reply: Callable[[Received], tuple[int, str, bytes]]
    received: list[Received] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(lambda _: (200, wire.CONTENT_TYPE, wire.encode_message(wire.TYPE_RESULT, {})))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            got = Received("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            fake.received.append(got)
            status, content_type, payload = fake.reply(got)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield fake
    httpd.shutdown()
    httpd.server_close()


def parse_form(content_type: str, body: bytes) -> dict[str, tuple[str | None, str, bytes]]:
    """name -> (filename, Content-Type, bytes), parsed by the standard library's MIME parser."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    assert message.is_multipart()
    return {part.get_param("name", header="content-disposition"):
            (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
            for part in message.iter_parts()}  # fmt: skip


# ---------------------------------------------------------------------------- the body
def test_the_morph_input_map_round_trips_byte_for_byte() -> None:
    fields = build_input([IMAGE, IMAGE[::-1]], ["a red circle", "ein blaues Dreieck ü"], {"num_frames": 4},
                         stream=False, deadline_s=30)  # fmt: skip
    fields[wire.image_ref_key(2)] = b"ab" * 32
    body, content_type = encode_multipart(fields)
    assert content_type.startswith("multipart/form-data; boundary=")
    form = parse_form(content_type, body)
    assert list(form) == list(fields)
    assert {name: data for name, (_, _, data) in form.items()} == fields
    assert form["image_0"][:2] == ("image_0", "application/octet-stream")
    assert form["image_ref_2"][:2] == ("image_ref_2", "application/octet-stream")
    assert form[wire.INPUT_OPTIONS][:2] == (None, "application/json")
    assert form["prompt_1"][:2] == (None, "text/plain")


def test_a_boundary_never_occurs_in_a_value() -> None:
    with pytest.raises(ValueError, match="boundary"):
        encode_multipart({"prompt_0": b"xx--fixed--xx"}, boundary="fixed")
    body, content_type = encode_multipart({"prompt_0": "é", "image_0": b""}, boundary="b0")
    assert body == (b'--b0\r\nContent-Disposition: form-data; name="prompt_0"\r\nContent-Type: text/plain\r\n\r\n'
                    b"\xc3\xa9\r\n"
                    b'--b0\r\nContent-Disposition: form-data; name="image_0"; filename="image_0"\r\n'
                    b"Content-Type: application/octet-stream\r\n\r\n\r\n--b0--\r\n")  # fmt: skip
    assert content_type == "multipart/form-data; boundary=b0"


# ---------------------------------------------------------------------------- answers
def test_a_result_comes_back_decoded_with_its_status_and_the_request_is_what_was_sent(server: FakeServer) -> None:
    result = wire.encode_message(wire.TYPE_RESULT, {"seed": 7}, [wire.Part("morph.gif", "image/gif", IMAGE)])
    server.reply = lambda _: (200, wire.CONTENT_TYPE, result)
    client = RestClient(server.url + "/", "my model", tokens=TokenSource(token="t0k"))
    message = client.morph([IMAGE, IMAGE], ["a", "b"], {"num_frames": 4}, deadline_s=30)
    assert message.header["seed"] == 7 and message.part().data == IMAGE
    (got,) = server.received
    assert got.path == "/predictions/my%20model"
    assert got.headers["authorization"] == "Bearer t0k"
    form = parse_form(got.headers["content-type"], got.body)
    assert form["image_1"][2] == IMAGE and json.loads(form["options"][2]) == {"num_frames": 4}
    assert float(form["deadline"][2]) == pytest.approx(time.time() + 30, abs=5)
    answer = client.post_fields({"image_0": IMAGE}, token=None)
    assert (answer.status, answer.body, answer.content_type, answer.ok) == (200, result, wire.CONTENT_TYPE, True)
    assert "authorization" not in server.received[-1].headers


@pytest.mark.parametrize("status", [400, 413, 500, 503, 507])
def test_error_statuses_come_back_with_the_servers_text(server: FakeServer, status: int) -> None:
    text = f'{{"code": {status}, "message": "no: ü"}}'
    server.reply = lambda _: (status, "application/json", text.encode())
    client = RestClient(server.url, tokens=TokenSource(enabled=False))
    answer = client.post_fields({"prompt_0": b"x"}, token="wrong-token", timeout_s=5)
    assert (answer.status, answer.text, answer.ok) == (status, text, False)
    with pytest.raises(wire.WireError):
        answer.message()
    with pytest.raises(RestError) as caught:
        client.morph([IMAGE, IMAGE], ["a", "b"])
    assert caught.value.status == status and caught.value.text == text
    assert str(caught.value) == f"HTTP {status}: {text}"


def test_a_200_that_is_not_a_message_is_an_error_for_morph(server: FakeServer) -> None:
    server.reply = lambda _: (200, "text/html", b"<html>proxy</html>")
    with pytest.raises(RestError, match="unreadable response.*proxy"):
        RestClient(server.url, tokens=TokenSource(enabled=False)).morph([IMAGE, IMAGE], ["a", "b"])


def test_any_bytes_can_be_posted_as_they_are(server: FakeServer) -> None:
    server.reply = lambda got: (200, "application/octet-stream", got.body[::-1])
    answer = RestClient(server.url).post_body(IMAGE, "application/x-nonsense", token="t")
    assert answer.body == IMAGE[::-1]
    got = server.received[-1]
    assert (got.body, got.headers["content-type"], got.headers["authorization"]) == (
        IMAGE, "application/x-nonsense", "Bearer t")
    RestClient(server.url).post_body(b"", None, token=None)
    assert "content-type" not in server.received[-1].headers


def test_a_refused_token_is_re_read_from_the_key_file_once(server: FakeServer, tmp_path: Path) -> None:
    key_file = tmp_path / "key_file.json"
    keys = lambda key: json.dumps({"inference": {"key": key}, "management": {"key": "m"}})  # noqa: E731
    key_file.write_text(keys("old"))
    tokens = TokenSource(key_file=key_file, use_env=False)
    assert tokens.get() == "old"
    stamp = key_file.stat()
    key_file.write_text(keys("new"))  # rotated, and looks unchanged (same size and mtime):
    os.utime(key_file, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # only the refusal re-reads it

    def reply(got: Received) -> tuple[int, str, bytes]:
        if got.headers.get("authorization") == "Bearer new":
            return 200, wire.CONTENT_TYPE, wire.encode_message(wire.TYPE_RESULT, {})
        return 400, "application/json", b'{"message": "Token Authorization failed. Token either incorrect"}'

    server.reply = reply
    answer = RestClient(server.url, tokens=tokens).predict({"prompt_0": b"x"})
    assert answer.status == 200
    assert [g.headers["authorization"] for g in server.received] == ["Bearer old", "Bearer new"]
    # A refusal that re-reading cannot fix is returned after one more try, not looped on.
    server.reply = lambda _: (403, "text/plain", b"forbidden")
    server.received.clear()
    assert RestClient(server.url, tokens=tokens).predict({"prompt_0": b"x"}).status == 403
    assert len(server.received) == 1  # the key file did not change: no second attempt
    assert token_refused(401, "") and token_refused(400, "Token Authorization failed.")
    assert not token_refused(400, "field 'options' is not JSON") and not token_refused(503, "")


# ---------------------------------------------------------------------------- no answer
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_server_is_no_answer_not_a_closed_connection() -> None:
    with pytest.raises(RestNoAnswer) as caught:
        RestClient(f"http://127.0.0.1:{free_port()}").post_fields({"prompt_0": b"x"}, token=None, timeout_s=5)
    assert caught.value.closed is False and "cannot connect" in str(caught.value)


def silent_listener(close_after_headers: bool) -> tuple[socket.socket, threading.Thread]:
    """Accepts one connection; either closes it (with a reset) once the headers arrived, or
    keeps it open without answering."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += connection.recv(65536)
        if close_after_headers:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            connection.close()
        else:
            time.sleep(3)
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def test_a_connection_closed_mid_upload_is_no_answer_marked_closed() -> None:
    listener, thread = silent_listener(close_after_headers=True)
    client = RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}")
    with pytest.raises(RestNoAnswer) as caught:
        client.post_fields({"image_0": b"\0" * (32 << 20)}, token=None, timeout_s=10)  # far beyond socket buffers
    assert caught.value.closed is True and "closed the connection" in str(caught.value)
    thread.join(5)
    listener.close()


def test_a_server_that_never_answers_times_out() -> None:
    listener, thread = silent_listener(close_after_headers=False)
    started = time.monotonic()
    with pytest.raises(RestNoAnswer) as caught:
        RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}").post_fields({"a": b"x"}, token=None, timeout_s=0.5)
    assert time.monotonic() - started < 2.5
    assert caught.value.closed is False and "no answer" in str(caught.value)
    thread.join(5)
    listener.close()


def test_rejects_urls_it_cannot_post_to() -> None:
    for url in ("127.0.0.1:8080", "ftp://host/x", "http://"):
        with pytest.raises(ValueError, match="REST URL"):
            RestClient(url)
    assert RestClient("https://h:1/ts/").url == "https://h:1/ts/predictions/diffmorpher"


# ---------------------------------------------------------------------------- gevent / Locust
def run_python(code: str, timeout: float = 120) -> dict:
    process = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=timeout, env=dict(os.environ))  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_requests_overlap_under_gevent_monkey_patching(server: FakeServer) -> None:
    """As under Locust: 4 requests in 4 greenlets against a server taking 1 s each finish in
    about 1 s, not 4 (the client's sockets yield to the gevent loop)."""
    def slow(_: Received) -> tuple[int, str, bytes]:
        time.sleep(1.0)
        return 200, wire.CONTENT_TYPE, wire.encode_message(wire.TYPE_RESULT, {})

    server.reply = slow
    code = (
        "from gevent import monkey; monkey.patch_all()\n"
        "import gevent, json, time\n"
        "from client.rest import RestClient\n"
        f"client = RestClient({server.url!r})\n"
        "started = time.perf_counter()\n"
        "jobs = [gevent.spawn(client.post_fields, {'prompt_0': b'x'}, token=None, timeout_s=10) for _ in range(4)]\n"
        "gevent.joinall(jobs, raise_error=True)\n"
        "print(json.dumps({'s': time.perf_counter() - started, 'status': [j.value.status for j in jobs]}))\n"
    )
    result = run_python(code)
    assert result["status"] == [200] * 4 and len(server.received) == 4
    assert result["s"] < 2.5, result


def test_the_locust_rest_user_fires_the_same_events_and_ledger_codes(server: FakeServer) -> None:
    """RestMorphUser on client.rest: an answer is a "REST predictions morph" event (with the
    handler's own time as "handler morph time"), a full queue a "REST predictions busy" failure,
    another status a morph failure, no answer a lost request; each counted in the ledger."""
    answers = iter([
        (200, wire.CONTENT_TYPE, wire.encode_message(wire.TYPE_RESULT, {"timings": {"total": 0.25}},
                                                     [wire.Part("morph.gif", "image/gif", b"GIF89a")])),
        (503, "application/json", b'{"message": "Model has no worker to serve inference request"}'),
        (500, "application/json", b'{"message": "morph failed"}'),
    ])
    server.reply = lambda _: next(answers)
    code = (
        "import json, random, types\n"
        "import locust\n"
        "from locust.env import Environment\n"
        "from loadtest import locustfile as lf\n"
        "from loadtest.profiles import load_profile\n"
        "from loadtest.schedule import StepSchedule\n"
        "from loadtest.targets import Target\n"
        "env = Environment(user_classes=[lf.RestMorphUser])\n"
        "env.create_local_runner()\n"
        "options = types.SimpleNamespace(no_token=True, seed=1, think_seconds=0.0, backoff_seconds=1.0,\n"
        "                                backoff_max_seconds=2.0, model_name='diffmorpher')\n"
        "profile = load_profile('tiny')\n"
        "images, prompts = profile.inputs()\n"
        f"targets = [Target('127.0.0.1:1', {server.url!r}, ''), Target('127.0.0.1:2', 'http://127.0.0.1:1', '')]\n"
        "state = lf.RunState(options, profile, images, prompts, StepSchedule.parse('1', 10, 10), targets)\n"
        "env.morph_run = state\n"
        "events = []\n"
        "env.events.request.add_listener(lambda **e: events.append({'type': e['request_type'], 'name': e['name'],\n"
        "    'bytes': e['response_length'], 'ms': e['response_time'], 'target': e['context']['target'],\n"
        "    'error': type(e['exception']).__name__ if e['exception'] else None}))\n"
        "user = lf.RestMorphUser(env)\n"
        "user.on_start()\n"
        "for _ in range(3): user.predictions()\n"
        "lost = lf.RestMorphUser(env)\n"
        "lost.on_start()\n"
        "lost.predictions()\n"
        "print(json.dumps({'events': events, 'ledger': state.ledger.to_dict()}))\n"
    )
    result = run_python(code)
    events = [{k: e[k] for k in ("type", "name", "error")} for e in result["events"]]
    assert events == [
        {"type": "REST", "name": "predictions morph", "error": None},
        {"type": "handler", "name": "morph time", "error": None},
        {"type": "REST", "name": "predictions busy", "error": "ServerBusy"},
        {"type": "REST", "name": "predictions morph", "error": "UnexpectedAnswer"},
        {"type": "REST", "name": "predictions morph", "error": "UnexpectedAnswer"},
    ]
    first, handler = result["events"][:2]
    assert first["bytes"] == len(wire.encode_message(wire.TYPE_RESULT, {"timings": {"total": 0.25}},
                                                     [wire.Part("morph.gif", "image/gif", b"GIF89a")]))
    assert handler["ms"] == pytest.approx(250.0, abs=1.0)
    assert {e["target"] for e in result["events"][:4]} == {"127.0.0.1:1"} and result["events"][4]["target"] == "127.0.0.1:2"
    ledger = result["ledger"]
    assert ledger["by_target"]["127.0.0.1:1"]["codes"] == {"HTTP 200": 1, "HTTP 503": 1, "HTTP 500": 1}
    assert ledger["by_target"]["127.0.0.1:2"]["codes"] == {"HTTP no answer": 1}
    assert ledger["totals"] == {"sent": 4, "answered": 3, "ok": 1, "busy": 1, "error": 1, "lost": 1, "unaccounted": 0}
    got = server.received[0]
    assert got.path == "/predictions/diffmorpher" and "authorization" not in got.headers
    images, prompts = load_profile("tiny").inputs()
    form = parse_form(got.headers["content-type"], got.body)
    assert (form["image_0"][2], form["prompt_1"][2]) == (images[0], prompts[1].encode())
