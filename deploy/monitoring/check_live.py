"""Run Prometheus against a live service and check every Grafana panel query returns data.

Starts `reprmerge serve` on a free port, and Prometheus (the `prometheus` on PATH, e.g. Debian's)
with deploy/monitoring/prometheus.yml adapted for it (local target, 1 s scrapes, alerts.yml loaded);
drives a short mixed load (predictions over many preferences, trade-offs, /v2, a refused oversized
body, one bundle reload); then evaluates every PromQL expression of the dashboard and every alert
rule. Exit 1 if a panel query returns no data or a rule is unhealthy. `make monitoring-check`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "grafana" / "dashboards" / "reprmerge.json"
CLI = "import sys; from reprmerge_core.cli import main; sys.exit(main())"
KEY = "monitoring-check"
RATE_WINDOW = "30s"  # stands for Grafana's $__rate_interval: many 1 s scrapes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(url: str, what: str, proc: subprocess.Popen[bytes], log: Path, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    sys.exit(f"{what} not ready after {limit:g} s:\n{log.read_text()[-3000:]}")


def local_config(port: int, out: Path) -> Path:
    """The project's prometheus.yml with the local target, fast scrapes and the alert rules by absolute path."""
    config = yaml.safe_load((HERE / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(HERE / name) for name in config.get("rule_files", [])]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    path = out / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


async def load(url: str, bundle: Path, seconds: float) -> dict[str, int]:
    """Mixed traffic for `seconds` from 8 clients; one reload midway; returns counts by status."""
    rng = random.Random(0)
    prefs = [[rng.random() + 0.01 for _ in range(3)] for _ in range(64)]
    codes: dict[str, int] = {}
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as c:
        tasks = (await c.get("/v1/info")).json()["tasks"]
        n = len(tasks)

        async def one(i: int) -> None:
            pref = [rng.random() + 0.01 for _ in range(n)] if n != 3 else rng.choice(prefs)
            if i % 10 == 0:
                r = await c.post("/v1/tradeoff", json={"preference": pref})
            elif i % 10 == 1:
                r = await c.post("/v2/models/reprmerge/infer", json={
                    "inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["an example"]}]})
            elif i % 50 == 2:
                r = await c.post("/v1/predict", content=b" " * (3 << 20), headers={"Content-Type": "application/json"})
            else:
                r = await c.post("/v1/predict", json={"texts": ["a short text", "another one"], "preference": pref})
            codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1

        async def client(k: int) -> None:
            i = k
            while time.monotonic() < end:
                await one(i)
                i += 8

        async def reload() -> None:
            await asyncio.sleep(seconds / 2)
            r = await c.post("/admin/reload", json={"bundle": str(bundle)}, timeout=300)
            codes[f"reload {r.status_code}"] = 1

        await asyncio.gather(*(client(k) for k in range(8)), reload())
    return codes


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"].replace("$__rate_interval", RATE_WINDOW)) for p in panels for t in p.get("targets",
                                                                                                            [])]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path(".cache/bundles/tiny"))
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the load run")
    parser.add_argument("--prometheus", default=shutil.which("prometheus") or "prometheus")
    args = parser.parse_args()
    bundle = args.bundle.resolve()
    work = Path(tempfile.mkdtemp(prefix="reprmerge-monitoring-"))
    port, prom_port = free_port(), free_port()
    url, prom = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom_port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "REPRMERGE_API_KEY": KEY}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        service_log, prom_log = work / "service.log", work / "prometheus.log"
        procs.append(subprocess.Popen([sys.executable, "-c", CLI, "serve", str(bundle), "--port", str(port), "--device",
                                       "cpu"],
                                      stdout=service_log.open("w"), stderr=subprocess.STDOUT, env=env))
        procs.append(subprocess.Popen(
            [args.prometheus, f"--config.file={local_config(port, work)}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=prom_log.open("w"), stderr=subprocess.STDOUT))
        wait_until(f"{url}/readyz", "the service", procs[0], service_log)
        wait_until(f"{prom}/-/ready", "prometheus", procs[1], prom_log)
        codes = asyncio.run(load(url, bundle, args.seconds))
        print(f"load: {args.seconds:g} s, responses by status: {codes}")
        time.sleep(3)  # the last scrapes and rule evaluations
        empty = []
        for title, expr in dashboard_queries():
            result = httpx.get(f"{prom}/api/v1/query", params={"query": expr}).json()["data"]["result"]
            values = [float(r["value"][1]) for r in result]
            ok = any(not math.isnan(v) for v in values)
            print(f"{'ok   ' if ok else 'EMPTY'} {title}: {expr} -> {[round(v, 4) for v in values][:6]}")
            if not ok:
                empty.append(title)
        rules = httpx.get(f"{prom}/api/v1/rules").json()["data"]["groups"]
        unhealthy = [r["name"] for g in rules for r in g["rules"] if r["health"] != "ok"]
        print(f"alert rules: {sum(len(g['rules']) for g in rules)} loaded, unhealthy: {unhealthy or 'none'}")
        target = httpx.get(f"{prom}/api/v1/targets").json()["data"]["activeTargets"][0]
        print(f"target {target['scrapeUrl']}: {target['health']}")
        if empty or unhealthy or target["health"] != "up" or not codes.get("200"):
            print(f"FAILED: empty panels {empty}, unhealthy rules {unhealthy}")
            return 1
        print("all dashboard queries returned data")
        return 0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
