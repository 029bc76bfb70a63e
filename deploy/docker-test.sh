#!/usr/bin/env bash
# `make docker-test`: the image, `docker-compose up` and a Swarm stack, tested for real.
#
#   bash deploy/docker-test.sh            # what CI runs (.ci/run)
#   bash deploy/docker-test.sh --bench    # also measure 1, 2, 3 replicas through the proxy
#
# 1. a Docker engine (deploy/engine.sh installs docker.io and starts dockerd when missing);
# 2. the base image (deploy/base-image.sh builds it offline when it cannot be pulled; cached);
# 3. the app image and the proxy image (Docker's layer cache makes rebuilds quick);
# 4. docker-compose.yml brought up with Debian's docker-compose (Compose v1; Compose v2's
#    `docker compose` is used instead where installed), waited for, smoke-tested
#    (deploy/dockertest.py smoke) and taken down;
# 5. deploy/stack.yml on a one-node swarm (initialised here on 127.0.0.1 when the engine is
#    in no swarm, and left again at the end): replicas, load, rolling update, a killed
#    replica, a model rollout (deploy/dockertest.py swarm).
# Everything is torn down on exit, also on failure. Every step has a time limit; a failure
# ends the script with one line: "docker-test: FAIL: <reason>".
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}  # deploy/dockertest.py needs only the standard library
command -v curl >/dev/null 2>&1 || { echo "docker-test: FAIL: curl is missing" >&2; exit 1; }
PORT=${TRIAGE_PUBLISHED_PORT:-8000}
PROJECT=triage-docker-test
STACK=triage-test
IMAGE=${TRIAGE_IMAGE:-skin-lesion-triage:1.0.0}
PROXY_IMAGE=${TRIAGE_PROXY_IMAGE:-skin-lesion-triage-proxy:1.0.0}
BENCH=0
[ "${1:-}" = "--bench" ] && BENCH=1
export TRIAGE_PUBLISHED_PORT=$PORT TRIAGE_IMAGE=$IMAGE TRIAGE_PROXY_IMAGE=$PROXY_IMAGE

fail() { echo "docker-test: FAIL: $*" >&2; exit 1; }
step() { echo "docker-test [$(date +%H:%M:%S)]: $*" >&2; }
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

COMPOSE=()
SWARM_CREATED=0
cleanup() {
    local rc=$?
    trap - EXIT
    if [ ${#COMPOSE[@]} -gt 0 ]; then
        timeout 90 "${COMPOSE[@]}" -p "$PROJECT" down -v -t 10 >/dev/null 2>&1 || true
    fi
    if timeout 10 docker stack ls 2>/dev/null | grep -q "^$STACK "; then
        timeout 60 docker stack rm "$STACK" >/dev/null 2>&1 || true
        for _ in $(seq 60); do
            [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK")" ] \
                && ! docker network ls -q --filter "name=${STACK}_" | grep -q . && break
            sleep 1
        done
    fi
    if [ "$SWARM_CREATED" = 1 ]; then
        timeout 60 docker swarm leave --force >/dev/null 2>&1 || true
        timeout 30 docker network rm docker_gwbridge >/dev/null 2>&1 || true
    fi
    if [ $rc -eq 0 ]; then step "passed"; fi
    exit $rc
}
trap cleanup EXIT

step "engine"
bash deploy/engine.sh || fail "no Docker engine (see the line above)"

port_in_use "$PORT" && fail "port $PORT is in use on 127.0.0.1 (set TRIAGE_PUBLISHED_PORT)"

step "base image python:3.11-slim-bookworm"
bash deploy/base-image.sh || fail "no base image (see the line above)"

step "building $IMAGE"
start=$SECONDS
build_log=$(mktemp /tmp/docker-test-build.XXXXXX)
# The legacy builder (BuildKit off) is what reaches the package registries via --network host.
DOCKER_BUILDKIT=0 timeout 1500 docker build -q --network host -t "$IMAGE" . >"$build_log" 2>&1 \
    || fail "docker build of $IMAGE failed or took over 25 min: $(grep -v '^ ' "$build_log" | tail -n 1)"
step "built $IMAGE in $((SECONDS - start)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.2f GB", $1/1e9}'))"
DOCKER_BUILDKIT=0 timeout 900 docker build -q --network host -t "$PROXY_IMAGE" deploy/proxy \
    >"$build_log" 2>&1 \
    || fail "docker build of $PROXY_IMAGE failed or took over 15 min: $(grep -v '^ ' "$build_log" | tail -n 1)"
rm -f "$build_log"

# -- one machine: docker-compose.yml ------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    if ! command -v docker-compose >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || fail "no docker-compose and not root to install it"
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq \
            --no-install-recommends docker-compose >/dev/null || fail "apt-get install docker-compose failed"
    fi
    COMPOSE=(docker-compose)
fi
step "compose: ${COMPOSE[*]} ($("${COMPOSE[@]}" version --short 2>/dev/null || echo '?')) on port $PORT"
port_in_use "$PORT" && fail "port $PORT is in use on 127.0.0.1 (set TRIAGE_PUBLISHED_PORT)"
start=$SECONDS
timeout 120 "${COMPOSE[@]}" -p "$PROJECT" up -d --no-build >/dev/null 2>&1 \
    || fail "compose up failed: $(timeout 60 "${COMPOSE[@]}" -p "$PROJECT" logs --tail 1 2>&1 | tail -n 1)"
container=$(timeout 30 "${COMPOSE[@]}" -p "$PROJECT" ps -q api)
[ -n "$container" ] || fail "compose started no api container"
for _ in $(seq 180); do
    if [ "$(docker inspect -f '{{.State.Running}}' "$container")" != true ]; then
        fail "the api container exited: $(docker logs --tail 1 "$container" 2>&1)"
    fi
    curl -fsS -m 3 -o /dev/null "http://127.0.0.1:$PORT/health/ready" 2>/dev/null && break
    sleep 1
done
curl -fsS -m 3 -o /dev/null "http://127.0.0.1:$PORT/health/ready" \
    || fail "the compose service was not ready within 180 s"
step "compose service ready $((SECONDS - start)) s after \`up\`"
for _ in $(seq 60); do
    [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ] && break
    sleep 2
done
[ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ] \
    || fail "Docker never reported the compose container healthy (its healthcheck)"
step "compose container healthy $((SECONDS - start)) s after \`up\`, memory $(docker stats --no-stream --format '{{.MemUsage}}' "$container")"
timeout 300 "$PY" deploy/dockertest.py smoke --url "http://127.0.0.1:$PORT" --container "$container" \
    || fail "compose smoke test (see FAIL above)"
timeout 90 "${COMPOSE[@]}" -p "$PROJECT" down -v -t 10 >/dev/null 2>&1 || fail "compose down failed"

# -- several machines: deploy/stack.yml on a one-node swarm --------------------------------
state=$(docker info -f '{{.Swarm.LocalNodeState}}')
if [ "$state" = inactive ]; then
    timeout 60 docker swarm init --advertise-addr 127.0.0.1 >/dev/null || fail "docker swarm init failed"
    SWARM_CREATED=1
elif [ "$state" != active ]; then
    fail "this engine's swarm state is '$state'"
fi
for _ in $(seq 30); do port_in_use "$PORT" || break; sleep 1; done
port_in_use "$PORT" && fail "port $PORT is in use on 127.0.0.1 (set TRIAGE_PUBLISHED_PORT)"
step "swarm: docker stack deploy -c deploy/stack.yml $STACK (3 replicas)"
deployed=$(REPLICAS=3 timeout 120 docker stack deploy --resolve-image never -c deploy/stack.yml \
    "$STACK" 2>&1) || fail "docker stack deploy failed: $(echo "$deployed" | tail -n 1)"
if [ "$BENCH" = 1 ]; then  # first: the swarm test leaves a model mounted from a temp folder
    timeout 1200 "$PY" deploy/dockertest.py bench --url "http://127.0.0.1:$PORT" --stack "$STACK" \
        --concurrency 4 --seconds 30 || fail "bench (see FAIL above)"
fi
timeout 1500 "$PY" deploy/dockertest.py swarm --url "http://127.0.0.1:$PORT" --stack "$STACK" \
    --replicas 3 --concurrency 3 --seconds 20 || fail "swarm test (see FAIL above)"
