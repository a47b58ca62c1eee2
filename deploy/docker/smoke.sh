#!/usr/bin/env bash
# Build the image and run it for real (`make docker-smoke`; needs a running Docker engine, ~5-10 min):
# build (offline base made with debootstrap if python:3.11-slim cannot be pulled; torch from a local
# wheel folder if WHEELS is set or pip's find-links has one; pip's CA bundle as a build secret),
# run with a read-only root filesystem, wait for the HEALTHCHECK, predict through the published port,
# check the process is not root, serve a second bundle mounted via REPRMERGE_BUNDLE and reload into
# the first one (POST /admin/reload), then stop the container under load and count that every
# accepted request was answered. Prints build time, image size, time to healthy and the counts.
#   deploy/docker/smoke.sh [BUNDLE]        (default .cache/bundles/starter; `make serve` builds it)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BUNDLE=$(realpath "${1:-$ROOT/.cache/bundles/starter}")
IMAGE=${IMAGE:-reprmerge:smoke}
LOCAL_BASE=${LOCAL_BASE:-reprmerge-base:bookworm}
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
# A client whose `docker build` uses BuildKit: without the buildx plugin, recent clients refuse; the
# engine's own older client (Debian's /usr/bin/docker) still drives BuildKit itself.
DOCKER=${DOCKER:-docker}
if ! "$DOCKER" buildx version >/dev/null 2>&1 && [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi
KEY=smoke-key
WORK=$(mktemp -d)
CONTAINERS=()
WHEEL_SERVER=
cleanup() {
    for c in "${CONTAINERS[@]}"; do "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true; done
    [ -n "$WHEEL_SERVER" ] && kill "$WHEEL_SERVER" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
say() { printf '== %s\n' "$*"; }
"$DOCKER" info >/dev/null 2>&1 || { echo "no Docker engine reachable (start dockerd)" >&2; exit 2; }
[ -f "$BUNDLE/manifest.json" ] || { echo "no bundle at $BUNDLE (run make serve once, or pass one)" >&2; exit 2; }

# -- base image --------------------------------------------------------------------------------
BASE=${PYTHON_IMAGE:-python:3.11-slim-bookworm}
if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1 && ! timeout 60 "$DOCKER" pull -q "$BASE" >/dev/null 2>&1; then
    BASE=$LOCAL_BASE
    if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
        MIRROR=${MIRROR:-$(grep -rhoE 'https?://[^ ]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
                           | grep -v security | head -n1)}
        say "no $BASE and no registry: debootstrap bookworm from $MIRROR"
        ROOTFS=$WORK/rootfs
        nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOTFS" "$MIRROR" >/dev/null
        ln -sf python3 "$ROOTFS/usr/bin/python"
        rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
        tar -C "$ROOTFS" -c . | "$DOCKER" import -c 'CMD ["python3"]' - "$BASE" >/dev/null
    fi
fi
say "base image: $BASE"

# -- build -------------------------------------------------------------------------------------
BUILD_ARGS=(--build-arg "PYTHON_IMAGE=$BASE" --build-arg BUILD_BUNDLE=0)
WHEELS=${WHEELS:-$(pip config get global.find-links 2>/dev/null || true)}
if [ -n "$WHEELS" ] && ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then
    # a fixed port where free: the URL is a build argument, and a new one would miss the layer cache
    PORT=$("$PY" -c 'import socket; s = socket.socket()
try: s.bind(("127.0.0.1", 38573))
except OSError: s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
    "$PY" -m http.server --bind 127.0.0.1 --directory "$WHEELS" "$PORT" >/dev/null 2>&1 &
    WHEEL_SERVER=$!
    # torch from the folder (2.13.0+cpu ranks above the index's CUDA 2.13.0), its dependencies from the index
    BUILD_ARGS+=(--network host --build-arg "TORCH_PIP_ARGS=--find-links http://127.0.0.1:$PORT/")
    say "torch from the local wheels in $WHEELS"
fi
CERT=${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}
[ -n "$CERT" ] && [ -f "$CERT" ] && BUILD_ARGS+=(--secret "id=pip_cert,src=$CERT")
start=$(date +%s.%N)
DOCKER_BUILDKIT=1 nice -n 10 "$DOCKER" build -q "${BUILD_ARGS[@]}" -t "$IMAGE" "$ROOT" >/dev/null
BUILD_S=$(awk "BEGIN {print $(date +%s.%N) - $start}")
SIZE_MB=$(( $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
say "built $IMAGE in ${BUILD_S%.*} s, ${SIZE_MB} MB"

# -- run ---------------------------------------------------------------------------------------
run() {  # NAME BUNDLE_IN_CONTAINER EXTRA_DOCKER_ARGS...: start read-only, wait healthy; prints seconds to healthy
    local name=$1 served=$2; shift 2
    local t0; t0=$(date +%s.%N)
    "$DOCKER" run -d --name "$name" --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
        -p 127.0.0.1::8000 -e REPRMERGE_BUNDLE="$served" -e REPRMERGE_API_KEY=$KEY "$@" "$IMAGE" >/dev/null
    for _ in $(seq 1200); do
        case $("$DOCKER" inspect -f '{{.State.Health.Status}} {{.State.Status}}' "$name") in
            "healthy running") awk "BEGIN {print $(date +%s.%N) - $t0}"; return 0 ;;
            *exited*|*dead*) "$DOCKER" logs "$name" >&2; return 1 ;;
        esac
        sleep 0.5
    done
    "$DOCKER" logs "$name" >&2; return 1
}
url() { echo "http://$("$DOCKER" port "$1" 8000 | head -n1)"; }
predict() {  # URL -> bundle id of a prediction
    curl -sf -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \
        -d '{"texts": ["what a wonderful film"]}' "$1/v1/predict" | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["bundle_id"])'
}
bundle_id() { "$PY" -c 'import json, sys; print(json.load(open(sys.argv[1] + "/manifest.json"))["bundle_id"])' "$1"; }

# The server runs as uid 10001: mount a world-readable copy of the bundle.
chmod 755 "$WORK"
cp -r "$BUNDLE" "$WORK/first" && chmod -R a+rX "$WORK/first"
BUNDLE=$WORK/first
CONTAINERS+=(smoke-a smoke-b)  # here: `run` goes in a subshell
"$DOCKER" rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
HEALTHY_S=$(run smoke-a /bundles/a -v "$BUNDLE:/bundles/a:ro")
A=$(url smoke-a)
[ "$(predict "$A")" = "$(bundle_id "$BUNDLE")" ] || { echo "prediction did not name the mounted bundle" >&2; exit 1; }
USER_ID=$("$DOCKER" exec smoke-a id -u)
[ "$USER_ID" != 0 ] || { echo "the server runs as root" >&2; exit 1; }
[ "$("$DOCKER" inspect -f '{{.HostConfig.ReadonlyRootfs}}' smoke-a)" = true ]
if "$DOCKER" exec smoke-a sh -c 'echo x > /home/app/probe' 2>/dev/null; then echo "root filesystem is writable" >&2; exit 1; fi
say "healthy after ${HEALTHY_S%.*} s; predicted through $A; uid $USER_ID, read-only root filesystem"

# A second bundle (the first with the first task's head biases shifted: other answers, another id), served
# via REPRMERGE_BUNDLE.
SECOND=$WORK/second
"$PY" - "$BUNDLE" "$SECOND" <<'EOF'
import sys
from reprmerge_core.bundle import load_bundle, write_bundle
b = load_bundle(sys.argv[1]); m = b.manifest
from reprmerge_core.correction import TaskHead
heads = [TaskHead(h.weight, h.bias + (1.0 if i == 0 else 0.0)) for i, h in enumerate(b.heads)]  # another first task
write_bundle(sys.argv[2], tasks=m.tasks, statistics=b.statistics, heads=heads, backbone_dir=b.backbone_path,
             correction=m.correction, merge=m.merge, backbone=m.backbone)
EOF
chmod -R a+rX "$SECOND"
HEALTHY_B_S=$(run smoke-b /bundles/b -v "$SECOND:/bundles/b:ro" -v "$BUNDLE:/bundles/a:ro")
B=$(url smoke-b)
[ "$(predict "$B")" = "$(bundle_id "$SECOND")" ] || { echo "the second bundle is not served" >&2; exit 1; }
RELOAD=$(curl -sf -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' -d '{"bundle": "/bundles/a"}' "$B/admin/reload")
[ "$(predict "$B")" = "$(bundle_id "$BUNDLE")" ] || { echo "reload did not swap: $RELOAD" >&2; exit 1; }
say "second bundle $(bundle_id "$SECOND") served (healthy after ${HEALTHY_B_S%.*} s); reloaded in place: $RELOAD"
"$DOCKER" rm -f smoke-b >/dev/null

# -- stop under load ---------------------------------------------------------------------------
"$PY" - "$A" smoke-a "$KEY" "$DOCKER" <<'EOF'
import asyncio, json, subprocess, sys, time
import httpx
url, name, key, docker = sys.argv[1:]
counts = {"answered": 0, "refused_503": 0, "no_connection": 0}

async def client(c: httpx.AsyncClient, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            r = await c.post("/v1/predict", json={"texts": ["a request during shutdown"] * 4})
        except httpx.TransportError:  # the listener is gone (docker's port proxy then resets connections)
            counts["no_connection"] += 1
            await asyncio.sleep(0.1)
            continue
        kind = "answered" if r.status_code == 200 else "refused_503" if r.status_code == 503 else str(r.status_code)
        counts[kind] = counts.get(kind, 0) + 1

def predict_statuses(name: str, docker: str, minus: dict[int, int] | None = None) -> dict[int, int]:
    """/v1/predict requests by status in the server's access log (less `minus`, those logged before the load)."""
    logs = subprocess.run([docker, "logs", name], capture_output=True, text=True)
    out: dict[int, int] = {}
    for line in (logs.stdout + logs.stderr).splitlines():
        if line.startswith('{"request_id"'):
            entry = json.loads(line)
            if entry["route"] == "/v1/predict":
                out[entry["status"]] = out.get(entry["status"], 0) + 1
    return {k: v - (minus or {}).get(k, 0) for k, v in out.items() if v - (minus or {}).get(k, 0)}

async def main() -> None:
    stop = asyncio.Event()
    before = predict_statuses(name, docker)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        clients = [asyncio.create_task(client(c, stop)) for _ in range(16)]
        await asyncio.sleep(3)
        t0 = time.monotonic()
        await asyncio.to_thread(subprocess.run, [docker, "stop", "-t", "40", name], capture_output=True)
        stopped = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*clients)
    code = subprocess.run([docker, "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True, text=True).stdout.strip()
    server = predict_statuses(name, docker, minus=before)
    # Accepted = answered 200 by the server (admitted to the model): every one must have reached its client.
    print(f"== stop under load: docker stop took {stopped:.1f} s, exit code {code}; client saw {counts}; "
          f"server logged /v1/predict statuses {server}")
    assert code == "0", "the server did not exit cleanly"
    assert counts["answered"] > 0 and server.get(200, 0) == counts["answered"], "an accepted request was not answered"
    assert set(server) <= {200, 503}, "requests failed during the shutdown"

asyncio.run(main())
EOF
echo "SMOKE OK: build ${BUILD_S%.*} s, image ${SIZE_MB} MB, healthy after ${HEALTHY_S%.*} s"
