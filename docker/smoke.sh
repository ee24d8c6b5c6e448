#!/usr/bin/env bash
# Container smoke test of the CPU image, with podman: build docker/Dockerfile.cpu, run the image as a user
# would (read-only root, a tmpfs at /tmp, no capabilities, published on 127.0.0.1 only) and check, each
# check failing the script with a line that starts with "[smoke] FAILED":
#
#   1. the image: no torch in it, its size;
#   2. /readyz answers 200;
#   3. POST /v1/segment with weights/demo/sample.png, once per task (semantic, instance, panoptic): the answer
#      equals what `m2f serve --model weights/demo/model.onnx` outside the container answers for the same
#      image. Only the per-request timings are ignored (see IGNORED_FIELDS in docker/smoke_http.py);
#   4. /metrics counts those three answers;
#   5. the process runs as uid 10001 on a read-only root filesystem, writing only under /tmp;
#   6. `podman healthcheck run` passes (the image's HEALTHCHECK);
#   7. drain: SIGTERM (`podman stop`) while a request is being uploaded: /readyz turns 503, the request is
#      answered 200, the container exits 0 (the service is PID 1, so the signal it raises again after the
#      drain leaves it to exit normally) well before podman would kill it;
#   8. docker-compose.yml: its m2f service started with podman-compose (the image above, the file's
#      settings), its healthcheck, and Prometheus (the host's `prometheus`, with docker/prometheus/
#      prometheus.yml and alerts.yml, its target pointed at the published port: the prom/prometheus image
#      needs a registry) scraping it.
#
#   bash docker/smoke.sh          (from any folder; as root, or with podman set up for your user)
#
# Needs podman (runc where cgroups are not v2 only), python with the service installed (the reference
# server; the `serve` or `dev` extra), podman-compose and prometheus for step 8, and, where Docker Hub cannot
# be reached, mmdebstrap: the base image (the Dockerfile's PYTHON_IMAGE) is then a Debian bookworm root
# filesystem with python3 made by mmdebstrap, cached (M2F_SMOKE_CACHE) and imported into podman.
# .ci/install-deploy-tools installs all of them.
#
# Environment:
#   M2F_SMOKE_PYTHON   interpreter for the reference `m2f serve` and the HTTP checks (default: python)
#   M2F_SMOKE_BASE     auto (default): the Dockerfile's PYTHON_IMAGE when it is there or can be pulled, else
#                      mmdebstrap; `registry` or `mmdebstrap` forces one
#   M2F_SMOKE_CACHE    cache of the mmdebstrap root filesystem (default ~/.cache/mask2former-serve-smoke); it
#                      is made again when older than M2F_SMOKE_BASE_MAX_AGE_DAYS (default 7: security updates)
#   M2F_SMOKE_DEBIAN_MIRROR  Debian mirror for mmdebstrap (default http://deb.debian.org)
#   M2F_SMOKE_IMAGE    tag of the built image (default localhost/mask2former-serve:cpu, the compose file's)
#   M2F_SMOKE_COMPOSE  1 (default) runs step 8; 0 skips it
#
# Podman settings of this run only (a containers.conf in a temporary folder, through CONTAINERS_CONF):
# default ulimits at or below the machine's hard limits (podman's defaults are higher and fail in a
# sandbox with "setrlimit ... Operation not permitted"), and runc where cgroups are v1 or hybrid (crun
# refuses hybrid mode). Where the host's pip trusts an extra CA bundle (a TLS-inspecting proxy), the build
# mounts it over the base image's bundle, read-only, and points pip at it through a build argument of the
# throwaway build stage: nothing of it lands in the image. Idempotent: it removes what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${M2F_SMOKE_PYTHON:-python}
BASE_MODE=${M2F_SMOKE_BASE:-auto}
CACHE=${M2F_SMOKE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mask2former-serve-smoke}
MAX_AGE_DAYS=${M2F_SMOKE_BASE_MAX_AGE_DAYS:-7}
MIRROR=${M2F_SMOKE_DEBIAN_MIRROR:-http://deb.debian.org}
IMAGE=${M2F_SMOKE_IMAGE:-localhost/mask2former-serve:cpu}
COMPOSE=${M2F_SMOKE_COMPOSE:-1}
NAME=m2f-smoke
PROJECT=m2f-smoke-compose
SAMPLE=weights/demo/sample.png
MODEL=weights/demo/model.onnx
DEBIAN_SUITE=bookworm
DEBIAN_PACKAGES=python3,python3-venv,ca-certificates,python-is-python3
STOP_TIMEOUT_S=40 # podman stop's grace before SIGKILL: longer than the drain's bound (M2F_REQUEST_TIMEOUT_S=30)

started=$(date +%s)
log() { printf '[smoke +%ss] %s\n' "$(($(date +%s) - started))" "$*"; }

work=$(mktemp -d)
host_pid=""
prom_pid=""
compose_port=""
dump_logs() {
  if podman container exists "$NAME" 2>/dev/null; then
    echo "---- podman logs $NAME (last 40 lines)" >&2
    podman logs "$NAME" 2>&1 | tail -n 40 >&2 || true
  fi
  for f in "$work"/*.log; do
    [ -s "$f" ] || continue
    echo "---- $(basename "$f") (last 40 lines)" >&2
    tail -n 40 "$f" >&2
  done
}
fail() {
  printf '[smoke] FAILED: %s\n' "$*" >&2
  dump_logs
  exit 1
}
cleanup() {
  local rc=$?
  set +eu
  [ -n "$host_pid" ] && kill "$host_pid" 2>/dev/null && wait "$host_pid" 2>/dev/null
  [ -n "$prom_pid" ] && kill "$prom_pid" 2>/dev/null && wait "$prom_pid" 2>/dev/null
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1
  if [ -n "$compose_port" ]; then
    compose down -t 0 >/dev/null 2>&1
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# An HTTP check of docker/smoke_http.py, its line logged; its FAILED line (stderr) fails the script.
check() {
  local out
  out=$("$PY" docker/smoke_http.py "$@") || fail "$1 check (its output is above)"
  log "$out"
}

# ------------------------------------------------------------------------------------ tools, podman
command -v podman >/dev/null 2>&1 || fail "podman not found: bash .ci/install-deploy-tools installs it"
"$PY" -c 'import service.server' 2>/dev/null ||
  fail "$PY cannot import service.server: install the service (pip install -e '.[serve]') or set M2F_SMOKE_PYTHON"

hard_nofile=$(ulimit -Hn)
hard_nproc=$(ulimit -Hu)
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
[ "$hard_nproc" = unlimited ] && hard_nproc=4194304
nofile=$((hard_nofile < 65536 ? hard_nofile : 65536))
# A nproc limit at the hard limit itself is refused here (the sandbox counts differently): half of it.
nproc=$((hard_nproc / 2 < 32768 ? hard_nproc / 2 : 32768))
{
  echo "[containers]"
  echo "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]"
  if [ "$(stat -f -c %T /sys/fs/cgroup)" != cgroup2fs ]; then
    command -v runc >/dev/null 2>&1 || fail "cgroups v1/hybrid here: podman needs runc (crun refuses hybrid mode)"
    echo "[engine]"
    echo 'runtime = "runc"'
  fi
} >"$work/containers.conf"
export CONTAINERS_CONF="$work/containers.conf"
ulimits=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc") # podman build ignores default_ulimits
log "podman $(podman version --format '{{.Client.Version}}'), runtime $(podman info --format '{{.Host.OCIRuntime.Name}}'), ulimits nofile=$nofile nproc=$nproc"

# ------------------------------------------------------------------------------------- base image
default_base=$(sed -n 's/^ARG PYTHON_IMAGE=//p' docker/Dockerfile.cpu)
[ -n "$default_base" ] || fail "docker/Dockerfile.cpu has no 'ARG PYTHON_IMAGE=' default"
qualified=$default_base
case "$default_base" in
*/*) ;;                                           # a registry or a Docker Hub user's image
*) qualified="docker.io/library/$default_base" ;; # Docker Hub's official images
esac

mmdebstrap_base() {
  command -v mmdebstrap >/dev/null 2>&1 || fail "no registry reachable and mmdebstrap not found: bash .ci/install-deploy-tools"
  local dpkgopts=(
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
  )
  local sources=(
    "deb $MIRROR/debian $DEBIAN_SUITE main"
    "deb $MIRROR/debian $DEBIAN_SUITE-updates main"
    "deb $MIRROR/debian-security $DEBIAN_SUITE-security main"
  )
  local key
  key=$(printf '%s\n' "$DEBIAN_SUITE" "$DEBIAN_PACKAGES" "${dpkgopts[@]}" "${sources[@]}" | sha256sum | cut -c1-12)
  local tar="$CACHE/debian-$DEBIAN_SUITE-python-$key.tar"
  base="localhost/m2f-smoke-base:$DEBIAN_SUITE-$key"
  mkdir -p "$CACHE"
  if [ -f "$tar" ] && [ -n "$(find "$tar" -mtime +"$MAX_AGE_DAYS")" ]; then
    log "cached base root filesystem is older than $MAX_AGE_DAYS days: making it again"
    rm -f "$tar"
    podman rmi -f "$base" >/dev/null 2>&1 || true
  fi
  if [ ! -f "$tar" ]; then
    log "mmdebstrap: Debian $DEBIAN_SUITE with $DEBIAN_PACKAGES -> $tar"
    local t0
    t0=$(date +%s)
    rm -rf "$tar.partial"
    mmdebstrap --variant=minbase --format=tar --include="$DEBIAN_PACKAGES" --aptopt='APT::Install-Recommends "false"' \
      "${dpkgopts[@]}" "$DEBIAN_SUITE" "$tar.partial" "${sources[@]}" >"$work/mmdebstrap.log" 2>&1 ||
      fail "mmdebstrap failed"
    rm -rf "$tar"
    mv "$tar.partial" "$tar"
    podman rmi -f "$base" >/dev/null 2>&1 || true
    log "mmdebstrap took $(($(date +%s) - t0)) s"
  fi
  if ! podman image exists "$base"; then
    podman import --change 'CMD ["python3"]' "$tar" "$base" >/dev/null || fail "podman import $tar failed"
    log "imported $tar as $base"
  fi
}

base=""
case "$BASE_MODE" in
auto | registry)
  if podman image exists "$qualified"; then
    base=$qualified
  elif timeout 300 podman pull -q "$qualified" >"$work/pull.log" 2>&1; then
    base=$qualified
  elif [ "$BASE_MODE" = registry ]; then
    fail "cannot pull $qualified: $(tail -n 1 "$work/pull.log")"
  else
    log "cannot pull $qualified ($(tail -n 1 "$work/pull.log" | rev | cut -c1-100 | rev)): base image from mmdebstrap"
    mmdebstrap_base
  fi
  ;;
mmdebstrap) mmdebstrap_base ;;
*) fail "M2F_SMOKE_BASE=$BASE_MODE: expected auto, registry or mmdebstrap" ;;
esac
log "base image $base"

# ------------------------------------------------------------------------------------------ build
build_args=(--build-arg "PYTHON_IMAGE=$base")
pip_config=$("$PY" -m pip config list 2>/dev/null || true)
pip_cert=${PIP_CERT:-$(printf '%s\n' "$pip_config" | sed -n "s/^global\.cert='\(.*\)'$/\1/p" | tail -n 1)}
if [ -n "$pip_cert" ]; then
  [ -f "$pip_cert" ] || fail "the host's pip CA bundle $pip_cert is not a file"
  build_args+=(-v "$(readlink -f "$pip_cert"):/etc/ssl/certs/ca-certificates.crt:ro")
  build_args+=(--build-arg PIP_CERT=/etc/ssl/certs/ca-certificates.crt)
  log "pip in the build trusts the host's CA bundle $pip_cert (mounted read-only, not in the image)"
fi
pip_index=${PIP_INDEX_URL:-$(printf '%s\n' "$pip_config" | sed -n "s/^global\.index-url='\(.*\)'$/\1/p" | tail -n 1)}
case "$pip_index" in
http://* | https://*)
  build_args+=(--build-arg "PIP_INDEX_URL=$pip_index")
  log "pip in the build uses the host's index $pip_index"
  ;;
esac

log "podman build -f docker/Dockerfile.cpu -t $IMAGE"
t0=$(date +%s)
# --format docker: the OCI format has no HEALTHCHECK. --network host: the build's pip reaches what the host
# reaches, without a bridge.
podman build --format docker --network host "${ulimits[@]}" "${build_args[@]}" \
  -f docker/Dockerfile.cpu -t "$IMAGE" . >"$work/build.log" 2>&1 || fail "podman build failed"
build_s=$(($(date +%s) - t0))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
# Earlier builds' images, untagged now: without this every changed build would keep another ~500 MB.
podman image prune -f >/dev/null || true
log "built $IMAGE in $build_s s: $((size / 1000000)) MB"

podman run --rm "${ulimits[@]}" --no-healthcheck --entrypoint python "$IMAGE" -c \
  'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)' ||
  fail "the CPU image has torch installed"
log "no torch in the image"
# What the answers depend on, in the image and on the host (the reference): told, so that a difference in
# the comparison below can be traced to a version.
versions='from importlib.metadata import version
print(", ".join(f"{p} {version(p)}" for p in ("onnxruntime", "numpy", "pillow", "pycocotools")))'
image_versions=$(podman run --rm "${ulimits[@]}" --no-healthcheck --entrypoint python "$IMAGE" -c "$versions" 2>&1)
host_versions=$("$PY" -c "$versions" 2>&1)
if [ "$image_versions" = "$host_versions" ]; then
  log "image and host: $image_versions"
else
  log "image: $image_versions; host (reference): $host_versions"
fi

# ------------------------------------------------------------------------------ run: the checks
podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
port=$(free_port)
host_port=$(free_port)
url=http://127.0.0.1:$port
host_url=http://127.0.0.1:$host_port

# The reference: the same model served outside the container.
M2F_LOG_LEVEL=warning "$PY" -m m2f.cli serve --model "$MODEL" --host 127.0.0.1 --port "$host_port" \
  >"$work/reference-server.log" 2>&1 &
host_pid=$!

# stderr to a file: without systemd, podman logs errors about the healthcheck's timer there (harmless:
# `podman healthcheck run` below runs the check), and so does the container's cleanup when it stops.
podman run -d --name "$NAME" --read-only --tmpfs /tmp:rw,size=512m,mode=1777 --cap-drop ALL \
  --security-opt no-new-privileges -p "127.0.0.1:$port:8000" "$IMAGE" >/dev/null 2>"$work/podman-run.log" ||
  fail "podman run failed"
log "started $NAME on $url (reference m2f serve on $host_url)"

check ready "$url" 180
check ready "$host_url" 180
check compare "$host_url" "$url" "$SAMPLE"
check metrics "$url" 3

uid_line=$(podman exec "$NAME" cat /proc/1/status | awk '/^Uid:/ {print $2, $3, $4, $5}')
[ "$uid_line" = "10001 10001 10001 10001" ] || fail "the service runs with uids '$uid_line', expected 10001"
[ "$(podman inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$NAME")" = true ] || fail "root filesystem not read-only"
if podman exec "$NAME" touch /opt/m2f/probe 2>"$work/touch.err"; then
  fail "the container could write /opt/m2f/probe: root filesystem not read-only"
fi
grep -q 'Read-only file system' "$work/touch.err" || fail "writing / failed, but not as read-only: $(cat "$work/touch.err")"
podman exec "$NAME" test -d /tmp/m2f-cache || fail "no ONNX Runtime cache under /tmp: does the service write elsewhere?"
log "runs as uid 10001 on a read-only root filesystem (writes only under /tmp)"

podman healthcheck run "$NAME" >"$work/healthcheck.log" 2>&1 || fail "podman healthcheck run: $(cat "$work/healthcheck.log")"
log "podman healthcheck run: healthy"

check drain "$url" "$SAMPLE" -- podman stop -t "$STOP_TIMEOUT_S" "$NAME"
exit_code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
[ "$exit_code" = 0 ] || fail "the container exited $exit_code after podman stop, expected 0"
log "container exited 0 after the drain"
podman rm -f "$NAME" >/dev/null 2>>"$work/podman-run.log"

kill "$host_pid" 2>/dev/null || true
wait "$host_pid" 2>/dev/null || true
host_pid=""

# ---------------------------------------------------------------------- docker-compose.yml + Prometheus
# The service loads a model mounted at /models (a copy of the demo model: the way users bring their own).
compose() {
  M2F_PUBLISH="127.0.0.1:$compose_port" M2F_MODELS_DIR="$work/models" M2F_MODEL=/models/yours.onnx \
    podman-compose --project-name "$PROJECT" -f docker-compose.yml "$@"
}
if [ "$COMPOSE" = 1 ]; then
  command -v podman-compose >/dev/null 2>&1 || fail "podman-compose not found: bash .ci/install-deploy-tools"
  command -v prometheus >/dev/null 2>&1 || fail "prometheus not found: bash .ci/install-deploy-tools"
  compose_port=$(free_port)
  prom_port=$(free_port)
  mkdir -p "$work/models" "$work/prometheus"
  cp "$MODEL" "$work/models/yours.onnx"
  chmod a+r "$work/models/yours.onnx"
  compose down -t 0 >/dev/null 2>&1 || true
  # Only the m2f service: the prom/prometheus and grafana images need a registry. Its image is the one built
  # above (the compose file's image name), so nothing is built again.
  compose up -d --no-build m2f >"$work/compose.log" 2>&1 || fail "podman-compose up m2f failed"
  compose_url=http://127.0.0.1:$compose_port
  container=$(podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' | head -n 1)
  [ -n "$container" ] || fail "podman-compose started no container"
  log "podman-compose: $container from docker-compose.yml on $compose_url"
  check ready "$compose_url" 180
  podman healthcheck run "$container" >"$work/healthcheck.log" 2>&1 ||
    fail "podman healthcheck run $container (compose's healthcheck): $(cat "$work/healthcheck.log")"

  # docker/prometheus as it is, but for the target: the host's port instead of the compose network's name.
  sed "s|\"m2f:8000\"|\"127.0.0.1:$compose_port\"|" docker/prometheus/prometheus.yml >"$work/prometheus/prometheus.yml"
  grep -q "127.0.0.1:$compose_port" "$work/prometheus/prometheus.yml" ||
    fail "docker/prometheus/prometheus.yml has no target \"m2f:8000\" to point at the container"
  cp docker/prometheus/alerts.yml "$work/prometheus/"
  prometheus --config.file="$work/prometheus/prometheus.yml" --storage.tsdb.path="$work/prometheus/data" \
    --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$work/prometheus.log" 2>&1 &
  prom_pid=$!
  "$PY" - "$compose_url" "$SAMPLE" <<'EOF' || fail "the compose service's model or answer (output above)"
import json, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
with opener.open(f"{sys.argv[1]}/v1/model", timeout=10) as response:
    path = json.load(response)["runner"].get("path")
    assert path == "/models/yours.onnx", f"the compose service serves {path}, not the mounted /models/yours.onnx"
request = urllib.request.Request(f"{sys.argv[1]}/v1/segment", data=open(sys.argv[2], "rb").read(),
                                 headers={"Content-Type": "image/png"})
with opener.open(request, timeout=60) as response:
    assert response.status == 200, response.status
EOF
  log "the compose service serves the model mounted at /models/yours.onnx"
  check scraped "http://127.0.0.1:$prom_port" m2f 1
  t0=$(date +%s)
  compose down >"$work/compose-down.log" 2>&1 || fail "podman-compose down failed"
  down_s=$(($(date +%s) - t0))
  # The file's stop_grace_period is 40 s: as long means the service did not stop on SIGTERM and was killed.
  [ "$down_s" -lt "$STOP_TIMEOUT_S" ] || fail "podman-compose down took $down_s s: the service ignored SIGTERM"
  log "podman-compose down in $down_s s"
  kill "$prom_pid" 2>/dev/null || true
  wait "$prom_pid" 2>/dev/null || true
  prom_pid=""
fi

log "all checks passed (image $IMAGE, $((size / 1000000)) MB, built in $build_s s)"
