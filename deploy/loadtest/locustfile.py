"""Open-loop Locust scenarios for reprmerge.

    locust -f deploy/loadtest/locustfile.py --headless -u 1 --run-time 60s --host http://127.0.0.1:8000 \
        --rate 20 --mix zipf --distinct 1000

Locust users are closed loops: a user sends its next request only after the previous answer, so a
slow server slows the load down and hides its own latency (coordinated omission). Here one user is
the whole arrival process instead (run with -u 1; several users split --rate): it schedules arrival
times in advance (Poisson, or constant pacing) and at each one spawns a greenlet that sends the
request, never waiting for earlier answers. Each request is reported twice: as Locust measures it
("/v1/predict", from the send) and from its scheduled arrival ("/v1/predict [scheduled]"), so a late
send, when the client itself is busy, counts against latency as well; the send lag is in the event
context to spot a client-bound run. Arrivals past --max-in-flight are dropped by the client and
reported as failures, never delayed. When the run stops, requests in flight get up to
--drain-seconds to finish; any still open are reported as failures (a load test that forgot its
slowest requests would flatter the tail).
"""

from __future__ import annotations

import random
import time
from argparse import ArgumentParser

import gevent
from gevent.pool import Pool
from locust import FastHttpUser, events, task
from mixes import MIXES, make_mix, request_texts

SCHEDULED = "/v1/predict [scheduled]"


class ClientDropped(Exception):
    """The arrival found --max-in-flight requests open: the client, not the server, could not send it."""


class Refused(Exception):
    """A response other than 200 (e.g. 429 when the queue is full, 504 past the deadline, 0: no connection)."""


class Unfinished(Exception):
    """Still open --drain-seconds after the run stopped."""


@events.init_command_line_parser.add_listener
def add_options(parser: ArgumentParser) -> None:
    parser.add_argument("--rate", type=float, default=20.0, help="arrivals per second, all users together")
    parser.add_argument("--arrivals", choices=("poisson", "constant"), default="poisson")
    parser.add_argument("--mix", choices=MIXES, default="zipf", help="preference mix (deploy/loadtest/mixes.py)")
    parser.add_argument("--distinct", type=int, default=100, help="distinct preferences of the zipf mix")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent")
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--max-in-flight", type=int, default=2000, help="open requests before arrivals are dropped")
    parser.add_argument("--drain-seconds", type=float, default=35.0, help="wait for open requests at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default="", env_var="REPRMERGE_API_KEY",
                        help="bearer key, if the service needs one")


class OpenLoopUser(FastHttpUser):
    """The arrival process of an open-loop load: sends never wait for answers."""

    concurrency = 2000  # connection pool: larger than any in-flight count we allow
    network_timeout = 60.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
        info = self.client.get("/v1/info", headers=self.headers).json()
        self.preference = make_mix(o.mix, len(info["tasks"]), distinct=o.distinct, zipf_s=o.zipf_s, seed=o.seed)
        self.texts = request_texts(512, seed=o.seed)
        self.rng = random.Random(o.seed)
        users = max(1, self.environment.runner.target_user_count if self.environment.runner else 1)
        self.rate = o.rate / users
        self.in_flight = Pool(o.max_in_flight)
        self.open: dict[int, float] = {}  # greenlet id -> scheduled arrival

    @task
    def arrive(self) -> None:
        o = self.environment.parsed_options
        next_at = time.perf_counter()
        while True:  # the runner stops this user at --run-time
            next_at += self.rng.expovariate(self.rate) if o.arrivals == "poisson" else 1.0 / self.rate
            gevent.sleep(max(0.0, next_at - time.perf_counter()))
            k = self.rng.randrange(len(self.texts))
            body = {"texts": [self.texts[(k + i) % len(self.texts)] for i in range(o.texts_per_request)],
                    "preference": self.preference()}
            if self.in_flight.full():
                self._report(next_at, 0, ClientDropped(f"{o.max_in_flight} requests in flight"))
            else:
                self.open[id(self.in_flight.spawn(self._send, body, next_at))] = next_at

    def _send(self, body: dict[str, object], scheduled: float) -> None:
        lag = time.perf_counter() - scheduled
        response = self.client.post("/v1/predict", json=body, headers=self.headers)
        code = response.status_code or 0
        del self.open[id(gevent.getcurrent())]
        self._report(scheduled, len(response.content or b""), None if code == 200 else Refused(f"HTTP {code}"),
                     lag=lag, status=code)

    def _report(self, scheduled: float, length: int, error: Exception | None, *, lag: float = 0.0,
                status: int = 0) -> None:
        self.environment.events.request.fire(
            request_type="POST", name=SCHEDULED, response_time=1e3 * (time.perf_counter() - scheduled),
            response_length=length, exception=error, context={"lag_ms": 1e3 * lag, "status": status},
        )

    def on_stop(self) -> None:
        self.in_flight.join(timeout=self.environment.parsed_options.drain_seconds)
        for scheduled in list(self.open.values()):
            self._report(scheduled, 0, Unfinished("still open when the run ended"))
        self.in_flight.kill(block=True, timeout=5)
