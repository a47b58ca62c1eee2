"""A local `reprmerge serve` process on a free loopback port (never a remote host), and the Prometheus text
parser: one launcher for the serving benchmark and deploy/loadtest's load and soak runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

CLI = "import sys; from reprmerge_cli import main; sys.exit(main())"


def metric_values(text: str) -> dict[str, float]:
    """Prometheus exposition text -> {series (name plus labels): value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


class LocalServer:
    """`reprmerge serve BUNDLE` on 127.0.0.1; SIGTERM (a drain) on exit. Its output goes to `log`, or to a
    temporary file (path printed) that is removed after a clean run and kept when the server failed, exited
    early or the caller set `failed`."""

    def __init__(self, bundle: Path, log: Path | None, *flags: str, ready_timeout: float = 180) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._temporary_log = log is None
        self.log = log or Path(tempfile.mkstemp(prefix="reprmerge-server-", suffix=".log")[1])
        self.failed = False
        self._args = [sys.executable, "-c", CLI, "serve", str(bundle), "--host", "127.0.0.1", "--port", str(port),
                      *flags]
        self._ready_timeout = ready_timeout
        self._env = {**os.environ, "HF_HUB_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false"}
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalServer:
        print(f"server log: {self.log}", flush=True)
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self._args, stdout=out, stderr=subprocess.STDOUT, env=self._env)
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log}\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.failed = True
        self.__exit__(None, None, None)
        raise TimeoutError(f"server not ready within {self._ready_timeout:g} s; log: {self.log}\n{self._log_tail()}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is None:
            return
        exited_early = self.proc.poll() is not None
        if not exited_early:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if kind is None and not (exited_early or self.failed) and self.proc.returncode == 0:
            if self._temporary_log:
                self.log.unlink(missing_ok=True)
        else:
            print(f"server exited with {self.proc.returncode}; its log is kept at {self.log}", flush=True)

    @property
    def process(self) -> subprocess.Popen[bytes]:
        """The running server's process (to signal it); an error outside the `with` block."""
        if self.proc is None:
            raise RuntimeError("the server is not started: use LocalServer in a `with` block")
        return self.proc

    def _log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, so a failed start says why without opening the file."""
        return self.log.read_text(errors="replace")[-chars:]

    def get(self, path: str) -> str:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        return metric_values(self.get("/metrics"))

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found")
