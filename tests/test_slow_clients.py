"""Stalled and numerous clients over a real uvicorn configured as `pocketgpt serve` configures it
(app/server.py): half a request line or half the headers is cut off after POCKETGPT_HEADER_TIMEOUT, half a body is
answered 408 after POCKETGPT_BODY_TIMEOUT (a dataset upload: when it stalls that long between chunks), and past
POCKETGPT_MAX_CONNECTIONS new requests get 503."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pocketgpt.app.server import http_protocol, uvicorn_options
from pocketgpt.app.testing import running_server
from tests.admin_helpers import ADMIN, make_app, make_settings

TIMEOUT = 1.0  # header and body deadline of the server under test
SLACK = 4.0  # what a loaded CI machine may add before the server acts


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[tuple[str, int]]:
    root = tmp_path_factory.mktemp("slow")
    settings = make_settings(root, tiny_checkpoint, header_timeout=TIMEOUT, body_timeout=TIMEOUT,
                             max_connections=6)
    with running_server(make_app(settings), **uvicorn_options(settings)) as url:
        yield url, int(url.rsplit(":", 1)[1])


@contextlib.contextmanager
def raw(port: int, first: bytes = b"") -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT + SLACK)
    try:
        if first:
            sock.sendall(first)
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, data = time.monotonic(), b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


@pytest.mark.parametrize("first", [
    b"",  # connects and says nothing
    b"POST /v1/gene",  # half a request line
    b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: appl",  # half the headers
], ids=["silent", "half-request-line", "half-headers"])
def test_half_a_request_head_is_cut_off(server, first: bytes) -> None:
    _, port = server
    with raw(port, first) as sock:
        data, waited = read_until_closed(sock)  # a socket timeout here (TimeoutError) means it stayed open
    assert data == b"" and waited < TIMEOUT + SLACK


def test_half_a_body_is_answered_408_and_closed(server) -> None:
    _, port = server
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer inference-key-for-tests\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    with raw(port, head + b'{"prompt": "the') as sock:
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert b'"code":"body_timeout"' in data and waited < TIMEOUT + SLACK


def test_a_stalled_upload_is_answered_408(server) -> None:
    url, port = server
    body = b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\nsome text'
    head = (f"POST /admin/datasets HTTP/1.1\r\nHost: x\r\nAuthorization: {ADMIN['Authorization']}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {len(body) + 1000}\r\n\r\n").encode()
    before = httpx.get(f"{url}/admin/datasets", headers=ADMIN).json()["data"]
    with raw(port, head + body) as sock:
        data, waited = read_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and waited < TIMEOUT + SLACK, data
    assert httpx.get(f"{url}/admin/datasets", headers=ADMIN).json()["data"] == before  # nothing kept


def test_a_slow_but_steady_upload_is_fine(server) -> None:
    url, _ = server

    def trickle() -> Iterator[bytes]:
        yield b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n'
        for _ in range(3):  # longer than the body timeout in all, never that long between two chunks
            time.sleep(TIMEOUT * 0.5)
            yield b"line of text\n"
        yield b"\r\n--B--\r\n"

    r = httpx.post(f"{url}/admin/datasets", headers={**ADMIN, "Content-Type": "multipart/form-data; boundary=B"},
                   content=trickle(), timeout=30)
    assert r.status_code == 201, r.text


def test_past_the_connection_cap_requests_get_503(server) -> None:
    url, port = server
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(raw(port)) for _ in range(6)]
        r = httpx.get(f"{url}/healthz", timeout=TIMEOUT + SLACK)
        assert r.status_code == 503
        assert len(socks) == 6
    deadline = time.monotonic() + SLACK
    while httpx.get(f"{url}/healthz").status_code != 200:  # the closed sockets free their places
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_the_header_deadline_works_with_h11_too(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """uvicorn picks httptools when installed, else h11: the deadline wraps either."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    settings = make_settings(tmp_path, tiny_checkpoint, header_timeout=TIMEOUT)
    options = {**uvicorn_options(settings), "http": http_protocol(TIMEOUT, H11Protocol)}
    with running_server(make_app(settings), **options) as url:
        port = int(url.rsplit(":", 1)[1])
        with raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n") as sock:
            data, waited = read_until_closed(sock)
        assert data == b"" and waited < TIMEOUT + SLACK
        # A kept-alive connection: the next request's half head is cut off too, and whole requests go through.
        with raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") as sock:
            answer = b""
            while not answer.endswith(b'{"status":"ok"}'):  # head and body may come in separate reads
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"GET /heal")
            data, waited = read_until_closed(sock)
        assert data == b"" and waited < TIMEOUT + SLACK
