"""The fake LLM server as a real subprocess, for integration and fault tests.

Usage::

    with fake_llm_process("--capacity", "8", "--latency-ms", "50") as llm:
        client = make_client(base_url=llm.url("/v1"))
        ...
        assert llm.stats()["rejected_429"] > 0
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class FakeLLM:
    """Handle on a running fake server: its URLs and admin routes."""

    base_url: str
    process: subprocess.Popen[bytes]

    def url(self, path: str) -> str:
        return self.base_url + path

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/admin/stats")

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Patch runtime knobs, e.g. ``configure(outage={"status": 503, "seconds": 5})``."""
        return self._call("POST", "/admin/config", knobs)

    def reset(self) -> None:
        self._call("POST", "/admin/reset")

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        response = httpx.request(method, self.url(path), json=body, timeout=5.0)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_healthy(llm: FakeLLM) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if llm.process.poll() is not None:
            raise RuntimeError(f"fake-llm exited with code {llm.process.returncode} at start")
        try:
            if httpx.get(llm.url("/health"), timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"fake-llm not healthy after {START_TIMEOUT_S} s")
        time.sleep(0.05)


@contextlib.contextmanager
def fake_llm_process(*args: str) -> Iterator[FakeLLM]:
    """Start `python -m consumer.fake_llm` on a free port; stop it (TERM, then KILL) at exit."""
    port = _free_port()
    command = [sys.executable, "-m", "consumer.fake_llm", "--port", str(port)]
    command += ["--host", "127.0.0.1", *args]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    llm = FakeLLM(f"http://127.0.0.1:{port}", process)
    try:
        _wait_healthy(llm)
        yield llm
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
