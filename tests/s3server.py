"""A real S3 API on 127.0.0.1 for the tests: moto's server, a counting/faulting proxy, fixtures.

`s3_server` (session) runs ``moto_server`` in a child process on a free port; `s3` (per
test) creates a fresh bucket with boto3 and points the standard AWS environment at the
server, so tensorfile finds it exactly as a user's code would. `s3_proxy` puts a small
HTTP proxy in front that counts the bytes the server served and can fail chosen requests.
Tests that use them skip, naming what is missing, when moto, boto3 or obstore are not
installed (`pip install -e .[test]` installs them).
"""

from __future__ import annotations

import http.client
import http.server
import importlib
import importlib.util
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

ACCESS_KEY = "tensorfile-test"
SECRET_KEY = "tensorfile-test-secret"
REGION = "us-east-1"


def require_s3() -> None:
    """Skip the calling test unless the S3 test stack is installed."""
    for module, why in (
        ("moto", "moto[server] (the S3 test server)"),
        ("boto3", "boto3 (creates the test buckets)"),
        ("obstore", "obstore (tensorfile's object-store client)"),
    ):
        try:
            importlib.import_module(module)
        except ImportError as e:  # not only ModuleNotFoundError: a broken install skips too
            pytest.skip(f"S3 tests need {why}: pip install -e .[test] ({e})")
    if importlib.util.find_spec("flask") is None:
        pytest.skip("S3 tests need moto[server] (flask): pip install -e .[test]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """``python -m moto.server`` in a child process on 127.0.0.1. `extra_env` reaches the
    server only (e.g. INITIAL_NO_AUTH_ACTION_COUNT=0 makes it check credentials)."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, **(extra_env or {}))
        self._proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).close()
                return
            except OSError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def boto3_client(endpoint: str) -> Any:
    import boto3
    import botocore.config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name=REGION,
        config=botocore.config.Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def point_env_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard AWS variables, for this test only; the rest of AWS_* cleared so that a
    developer's own profile or region cannot leak in."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    # No shared files from the developer's home.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)


_bucket_ids = itertools.count()


@dataclass
class S3Bucket:
    """A fresh, empty bucket on the test server; the environment points at `endpoint`."""

    name: str
    endpoint: str
    client: Any  # boto3 S3 client, straight to the server

    def url(self, key: str = "") -> str:
        return f"s3://{self.name}/{key}"

    def incomplete_uploads(self) -> list[dict[str, Any]]:
        return list(self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", []))

    def keys(self) -> list[str]:
        got = self.client.list_objects_v2(Bucket=self.name).get("Contents", [])
        return sorted(o["Key"] for o in got)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    require_s3()
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    point_env_at(monkeypatch, s3_server.endpoint)
    client = boto3_client(s3_server.endpoint)
    name = f"tf-test-{os.getpid()}-{next(_bucket_ids)}"
    client.create_bucket(Bucket=name)
    return S3Bucket(name, s3_server.endpoint, client)


# --- a counting, fault-injecting proxy --------------------------------------------------


@dataclass
class Request:
    method: str
    path: str  # with the query string
    status: int
    body_nbytes: int  # response body bytes served


@dataclass
class S3Proxy:
    """Forwards to `upstream`, records every request, and answers with `fail(method, path)`'s
    status instead of forwarding when it returns one: an S3 error body with code SlowDown
    for 503 (throttling, which clients retry), InjectedFault otherwise."""

    upstream: str
    endpoint: str = ""
    requests: list[Request] = field(default_factory=list)
    fail: Callable[[str, str], int | None] = lambda method, path: None
    _server: Any = None

    def served(self, method: str = "GET") -> int:
        """Response body bytes sent for `method` requests."""
        return sum(r.body_nbytes for r in self.requests if r.method == method)

    def start(self) -> S3Proxy:
        proxy = self
        host, port = self.upstream.rsplit("//", 1)[1].split(":")
        lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                try:
                    self._proxy()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request (e.g. a cancelled part)

            def _proxy(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status = proxy.fail(self.command, self.path)
                if status is not None:
                    code = b"SlowDown" if status == 503 else b"InjectedFault"
                    payload = (
                        b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>'
                        + code
                        + b"</Code><Message>injected by the test proxy</Message></Error>"
                    )
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    with lock:  # recorded before the client can see the answer
                        proxy.requests.append(Request(self.command, self.path, status, 0))
                    self.wfile.write(payload)
                    return
                # A fresh upstream connection per request: werkzeug closes idle ones.
                conn = http.client.HTTPConnection(host, int(port), timeout=120)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding")
                }
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                        self.send_header(k, v)
                if self.command != "HEAD" and resp.getheader("Content-Length") is None:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                conn.close()
                with lock:
                    proxy.requests.append(
                        Request(
                            self.command,
                            self.path,
                            resp.status,
                            0 if self.command == "HEAD" else len(data),
                        )
                    )
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def s3_proxy(s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Proxy]:
    """A proxy in front of the test server, with the environment pointed at the proxy
    (the `s3` bucket's boto3 client still talks to the server directly)."""
    proxy = S3Proxy(s3.endpoint).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()
