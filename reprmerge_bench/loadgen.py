"""HTTP load generators that cost little CPU, run as child processes so their CPU share can be reported.

- `wrk` (a compiled generator, Debian package `wrk`), used when installed: closed loop over N keep-alive
  connections, request bodies from a file through a Lua script, latency percentiles from its histogram.
- This module as a script (`python -m reprmerge_bench.loadgen`): raw asyncio streams (on uvloop when installed) writing
  pre-encoded HTTP/1.1 requests over keep-alive connections (no HTTP library on the hot path), closed
  loop (N connections) or open loop (Poisson arrivals at a rate, latency from each request's scheduled
  start, so a slow server cannot hide queueing: no coordinated omission).

Both report the same JSON record: requests sent, 2xx answers, status counts, transport errors by kind,
latency percentiles of the 2xx answers, elapsed seconds; `run_load` adds the generator's CPU share
(user + system CPU seconds of the child / wall seconds). Failures are counted, never raised.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Below uvicorn's default keep-alive timeout (5 s): a connection idle this long is closed by the
# client before reuse, so a reuse never races the server's close.
KEEPALIVE_EXPIRY = 2.0  # as service.client.KEEPALIVE_EXPIRY (not imported: this child stays light)
MAX_OPEN_LOOP_CONNECTIONS = 1024
PATH = "/v1/predict"

WRK_SCRIPT = r"""
local bodies = {}
local i = 0
init = function(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  i = math.random(#bodies)
end
request = function()
  i = i %% #bodies + 1
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"}, bodies[i])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_s": %%.6f, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, ' ..
    '"timeout": %%d, "p50_ms": %%.3f, "p95_ms": %%.3f, "p99_ms": %%.3f}\n',
    summary.requests, summary.duration / 1e6, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(95) / 1e3, latency:percentile(99) / 1e3))
end
"""


@dataclass
class Tally:
    """What one run saw: latencies of 2xx answers, status counts, transport errors by kind."""

    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    sent: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def record(self, elapsed: float, error: str | None, status: int) -> None:
        if error is not None:
            self.error(error)
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if 200 <= status < 300:
            self.latencies.append(elapsed)

    def summary(self, seconds: float, slo: float) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(q: float) -> float:
            return 1e3 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan

        return {"sent": self.sent, "ok": len(lat), "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "errors": self.errors, "elapsed_s": seconds, "p50_ms": pct(0.50), "p95_ms": pct(0.95),
                "p99_ms": pct(0.99), "within_slo": sum(1 for x in lat if x <= slo)}


class Connection:
    """One keep-alive HTTP/1.1 connection sending pre-encoded requests and reading whole answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = time.monotonic()
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        return cls(*await asyncio.open_connection(host, port))

    async def exchange(self, request: bytes) -> int:
        """Send one request, read its answer; the status code. Raises on a broken connection."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, close = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        await self.reader.readexactly(length)
        if close:
            self.close()
        self.idle_since = time.monotonic()
        return status

    def close(self) -> None:
        self.closed = True
        self.writer.close()


def error_kind(e: BaseException) -> str:
    """A short, stable name for a transport failure."""
    if isinstance(e, asyncio.IncompleteReadError):
        return "server closed the connection" if not e.partial else "answer cut short"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, ConnectionResetError):
        return "connection reset"
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    return type(e).__name__


def encode_requests(url: str, bodies: list[bytes]) -> list[bytes]:
    parts = urlsplit(url)
    head = (f"POST {PATH} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
            "Content-Length: {}\r\n\r\n")
    return [head.format(len(b)).encode() + b for b in bodies]


async def _attempt(pool: list[Connection], host: str, port: int, request: bytes,
                   timeout: float) -> tuple[str | None, int]:
    """One request on an idle pooled connection (or a new one); (error kind or None, status)."""
    conn: Connection | None = None
    while pool:
        candidate = pool.pop()
        if not candidate.closed and time.monotonic() - candidate.idle_since < KEEPALIVE_EXPIRY:
            conn = candidate
            break
        candidate.close()
    try:
        if conn is None:
            conn = await asyncio.wait_for(Connection.open(host, port), timeout)
        status = await asyncio.wait_for(conn.exchange(request), timeout)
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError) as e:
        if conn is not None:
            conn.close()
        return error_kind(e), 0
    if not conn.closed:
        pool.append(conn)
    return None, status


async def closed_loop(url: str, requests: list[bytes], connections: int, seconds: float, timeout: float) -> Tally:
    """`connections` workers, each sending its next request as soon as the last is answered."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tally, end = Tally(), time.perf_counter() + seconds
    rng = random.Random(0)

    async def worker() -> None:
        pool: list[Connection] = []
        i = rng.randrange(len(requests))
        while time.perf_counter() < end:
            i = (i + 1) % len(requests)
            start = time.perf_counter()
            tally.sent += 1
            error, status = await _attempt(pool, host, port, requests[i], timeout)
            tally.record(time.perf_counter() - start, error, status)
            if error is not None:
                await asyncio.sleep(0.01)  # a refusing server must not turn this into a busy loop
        for conn in pool:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return tally


async def open_loop(url: str, requests: list[bytes], rate: float, seconds: float, timeout: float) -> Tally:
    """Poisson arrivals at `rate`/s for `seconds`, each on an idle connection or a new one (up to a bound)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    tally, rng = Tally(), random.Random(0)
    pool: list[Connection] = []
    slots = asyncio.Semaphore(MAX_OPEN_LOOP_CONNECTIONS)

    async def one(request: bytes, scheduled: float) -> None:
        async with slots:
            error, status = await _attempt(pool, host, port, request, timeout)
        tally.record(time.perf_counter() - scheduled, error, status)  # from the scheduled start: waiting counts

    tasks, start = [], time.perf_counter()
    next_at = start
    while next_at - start < seconds:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(requests[tally.sent % len(requests)], next_at)))
        tally.sent += 1
        next_at += rng.expovariate(rate)
    await asyncio.gather(*tasks)
    for conn in pool:
        conn.close()
    return tally


def _run(coro: Any) -> tuple[Tally, str]:
    """Run on uvloop when installed (less CPU per request than asyncio's loop); the tally and the loop's name."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro), "asyncio"
    return uvloop.run(coro), "uvloop"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="raw-asyncio HTTP load generator for POST /v1/predict (JSON on stdout)")
    p.add_argument("--url", required=True)
    p.add_argument("--bodies", type=Path, required=True, help="one JSON request body per line")
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--connections", type=int, default=0, help="closed loop over this many connections")
    p.add_argument("--rate", type=float, default=0.0, help="open loop at this many requests/s")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--slo", type=float, default=0.5, help="seconds; answers within it are counted as `within_slo`")
    args = p.parse_args(argv)
    requests = encode_requests(args.url, [line for line in args.bodies.read_bytes().splitlines() if line])
    start = time.perf_counter()
    if args.rate > 0:
        tally, loop = _run(open_loop(args.url, requests, args.rate, args.seconds, args.timeout))
    else:
        tally, loop = _run(closed_loop(args.url, requests, max(1, args.connections), args.seconds, args.timeout))
    json.dump({**tally.summary(time.perf_counter() - start, args.slo), "loop": loop}, sys.stdout)
    return 0


# -- driving a generator as a child process --------------------------------------------------------
def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def _child(cmd: list[str]) -> tuple[str, str, int, float]:
    """Run `cmd`; (stdout, stderr, exit code, CPU seconds / wall seconds of the child alone)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, "PYTHONHASHSEED": "0"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return out.read().decode(), err.read().decode(), proc.returncode, (usage.ru_utime + usage.ru_stime) / wall


def run_load(url: str, bodies: list[bytes], seconds: float, *, connections: int = 0, rate: float = 0.0,
             generator: str = "auto", timeout: float = 30.0, slo: float = 0.5) -> dict[str, Any]:
    """One load run (closed loop over `connections`, or open loop at `rate`); the JSON record plus
    `generator` and `generator_cpu_share`. wrk serves closed loops when installed (generator "auto" or
    "wrk"); open loops always use the Python generator (wrk has no arrival rate)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
        f.write(b"\n".join(bodies) + b"\n")
    try:
        use_wrk = rate <= 0 and (generator == "wrk" or (generator == "auto" and wrk_available()))
        if use_wrk:
            with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
                lua.write(WRK_SCRIPT % {"path": PATH})
            try:
                cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", f"--timeout={timeout:g}s",
                       "-s", lua.name, url, "--", f.name]
                out, err, code, cpu = _child(cmd)
            finally:
                os.unlink(lua.name)
            record = _parse_wrk(out, err, code)
        else:
            cmd = [sys.executable, "-m", "reprmerge_bench.loadgen", "--url", url, "--bodies", f.name,
                   "--seconds", f"{seconds}", "--connections", str(connections), "--rate", f"{rate}",
                   "--timeout", f"{timeout}", "--slo", f"{slo}"]
            out, err, code, cpu = _child(cmd)
            try:
                record = json.loads(out)
            except ValueError:
                record = {"sent": 0, "ok": 0, "statuses": {}, "errors": {f"generator exited {code}": 1},
                          "elapsed_s": seconds, "p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan,
                          "stderr": err[-2000:]}
    finally:
        os.unlink(f.name)
    record.setdefault("within_slo", math.nan)
    record.update(generator="wrk" if use_wrk else f"python/{record.pop('loop', 'asyncio')}", generator_cpu_share=cpu)
    return record


def _parse_wrk(out: str, err: str, code: int) -> dict[str, Any]:
    """wrk's summary line (written by the Lua `done`), as the common record."""
    line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        return {"sent": 0, "ok": 0, "statuses": {}, "errors": {f"wrk exited {code}": 1}, "elapsed_s": math.nan,
                "p50_ms": math.nan, "p95_ms": math.nan, "p99_ms": math.nan, "stderr": (err or out)[-2000:]}
    w = json.loads(line[len("WRKJSON "):])
    errors = {k: w[k] for k in ("connect", "read", "write", "timeout") if w[k]}
    ok = w["requests"] - w["status"]
    return {"sent": w["requests"] + w["connect"] + w["timeout"], "ok": ok,
            "statuses": {"2xx": ok, "non-2xx": w["status"]}, "errors": errors, "elapsed_s": w["duration_s"],
            "p50_ms": w["p50_ms"], "p95_ms": w["p95_ms"], "p99_ms": w["p99_ms"]}


if __name__ == "__main__":
    sys.exit(main())
