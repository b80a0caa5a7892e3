"""Test helpers for HTTP servers: a uvicorn server in a background thread, ``livethinking
serve`` in subprocesses, a free port."""

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx2
import pytest
import uvicorn


def free_port() -> int:
    """A TCP port free on loopback now (another process may take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A uvicorn server for ``app`` on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()




class ServerProcess:
    """``livethinking serve`` in a subprocess on a free loopback port."""

    def __init__(self, checkpoint, api_key: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.auth = {"Authorization": f"Bearer {api_key}"}
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill up
        self.process = subprocess.Popen(
            [sys.executable, "-m", "livethinking", "serve", "--model", str(checkpoint),
             "--device", "cpu", "--port", str(self.port), "--enable-weight-updates",
             "--api-key", api_key, "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=self.log, text=True)

    def wait_ready(self, timeout=120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                pytest.fail(f"the server exited: {self.log.read()}")
            try:
                reply = httpx2.get(f"{self.url}/health", headers=self.auth, timeout=2)
                if reply.status_code == 200:
                    return
            except httpx2.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail("the server did not start")

    def post(self, path, body, timeout=120):
        return httpx2.post(f"{self.url}{path}", json=body, headers=self.auth, timeout=timeout)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@contextlib.contextmanager
def server_processes(checkpoint, count: int, *, api_key: str):
    """``count`` ready ``ServerProcess``es of ``checkpoint``, stopped on exit."""
    procs = [ServerProcess(checkpoint, api_key) for _ in range(count)]
    try:
        for p in procs:
            p.wait_ready()
        yield procs
    finally:
        for p in procs:
            p.close()
