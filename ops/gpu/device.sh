#!/bin/bash
# ON the GPU machine, in the repo root (the run tool's working directory). See ops/gpu/README.md.
#   bash ops/gpu/device.sh stage               calls 1 and 2 (carry .w1, then .w2): keep the vllm part
#                                              this call carried in /tmp/p, which outlives the call
#   bash ops/gpu/device.sh MEASUREMENT...      call 3 (carry .w3): install vLLM + DIO's wheels into
#                                              /tmp/site, start redis-server on 127.0.0.1:$REDIS_PORT, run
#                                              python -m dio.ops.gpu.measure MEASUREMENT... --out $OUT
#                                              Later calls on the same warm machine need no carry.
# Options through the environment: MEASURE_ARGS (extra measure.py options), T_MEASURE (seconds the
# measurements may take, default: what is left of 570 s), PYTHON (default python3).
set -uo pipefail
R=$(pwd)
OUT=${OUT:-/tmp/dio-out}; mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}        # vLLM + wheels, kept while the machine is held
PARTS=${PARTS:-/tmp/p}         # vllm tarball parts gathered over calls 1-3
BIN=${BIN:-/tmp/dio-bin}       # redis-server, kept while the machine is held
REDIS_PORT=${REDIS_PORT:-6379}
DIO_ROOT=${DIO_ROOT:-/tmp/dio-root}  # holds dio/ -> the working tree's folders (see link_dio)
TARBALL=vllm-0.26.0-nofa2.tar.xz
CALL_LIMIT_S=${CALL_LIMIT_S:-570}  # the run tool allows 600 s; leave time to copy $OUT back
T0=$(date +%s)
ts() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

stage() {
  mkdir -p "$PARTS"
  local f
  for f in .w*/"$TARBALL".part*; do [ -e "$f" ] && cp "$f" "$PARTS/"; done
  ls -la "$PARTS"
}

verify_parts() {
  cat "$PARTS/$TARBALL".part0[0-9] > "/tmp/$TARBALL" 2>/dev/null
  if ! (cd /tmp && sha256sum -c --quiet "$R/.w3/SHA256SUMS"); then
    (cd "$PARTS" && sha256sum -c "$R/.w3/SHA256SUMS.parts")
    echo "PARTS MISSING/CORRUPT: the machine was recycled or a call was skipped; redo calls 1 and 2"
    return 3
  fi
}

install() {
  if [ -f "$SITE/.dio-ready" ]; then ts "already installed in $SITE (warm machine)"; return 0; fi
  [ -f .w3/SHA256SUMS ] || { echo "NOTHING INSTALLED AND NO .w3: carry .w3 in this call"; return 3; }
  stage >/dev/null
  verify_parts || return 3
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .w3/wheels/*.whl || return 4
  tar -xJf "/tmp/$TARBALL" -C "$SITE" || return 5
  rm -f "/tmp/$TARBALL"
  install_redis || return 6
  touch "$SITE/.dio-ready"
  ts "installed: $(du -sh "$SITE" | cut -f1) in $SITE"
}

install_redis() {
  # $BIN/redis-server: Debian's 7.0.15 with its carried libraries when it runs here, else 6.2.5
  mkdir -p "$BIN" && cp -r .w3/redis/. "$BIN/" && chmod -R a+rX "$BIN" && chmod +x "$BIN"/redis-server-* "$BIN"/redis7/redis-server 2>/dev/null
  if [ -x "$BIN/redis7/redis-server" ] && \
     LD_LIBRARY_PATH="$BIN/redis7/lib" "$BIN/redis7/redis-server" --version >/dev/null 2>&1; then
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s/redis7/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s/redis7/redis-server" "$@"\n' \
      "$BIN" "$BIN" > "$BIN/redis-server"
    chmod +x "$BIN/redis-server"
  else
    ln -sf "$BIN/redis-server-6.2.5" "$BIN/redis-server"
  fi
  "$BIN/redis-server" --version
}

redis_ping() {  # plain bash: redis-py retries a refused connection for seconds
  local reply
  { exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT"; } 2>/dev/null || return 1
  printf 'PING\r\n' >&3; read -r -t 2 reply <&3; exec 3<&-
  [[ "$reply" == +PONG* ]]
}

start_redis() {
  if redis_ping; then ts "redis already answers on 127.0.0.1:$REDIS_PORT"; return 0; fi
  "$BIN/redis-server" --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes \
    --dir /tmp --logfile "$OUT/redis.log" --pidfile "/tmp/dio-redis-$REDIS_PORT.pid" || return 7
  local i
  for i in $(seq 50); do redis_ping && { ts "redis up on port $REDIS_PORT: $("$BIN/redis-server" --version | cut -d' ' -f3)"; return 0; }; sleep 0.2; done
  echo "REDIS DID NOT START"; tail -20 "$OUT/redis.log"; return 7
}

link_dio() {
  # The checkout is not installed here: give Python the `dio` import root that pyproject's
  # package-dir maps (dio.protocol = protocol/, ...), as links into the working tree.
  local d
  mkdir -p "$DIO_ROOT/dio"
  ln -sfn "$R/dio/__init__.py" "$DIO_ROOT/dio/__init__.py"
  for d in protocol client dispatcher gpu_worker ops; do ln -sfn "$R/$d" "$DIO_ROOT/dio/$d"; done
}

setup_env() {
  link_dio
  # PYTHONSAFEPATH: a process started in the repo root must not find the checkout's dio/ folder
  # (the bare root, without its subpackages) before the linked tree.
  export PYTHONPATH="$DIO_ROOT:$SITE" PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 \
    VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    DIO_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" DIO_TEST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/15" \
    DIO_REDIS_SERVER_BIN="$BIN/redis-server"
}

describe() {
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  "$PYTHON" -m pip list 2>/dev/null | grep -iE '^(torch|transformers|triton|numpy|prometheus.client|vllm|redis|pydantic|pytest) '
  df -h /tmp | tail -1
}

if [ "${1:-}" = "stage" ]; then
  stage; nvidia-smi -L; df -h /tmp | tail -1
  exit 0
fi
[ $# -gt 0 ] || { echo "usage: bash ops/gpu/device.sh stage | MEASUREMENT..."; exit 2; }

{
  ts "setup"
  install && setup_env && start_redis && describe
} 2>&1 | tee -a "$OUT/setup.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 0 ] || { echo "setup failed (rc=$rc), see setup.log"; exit "$rc"; }
setup_env
left=$(( CALL_LIMIT_S - ($(date +%s) - T0) ))
# measurements that replay several runs skip those that no longer fit before this time (epoch s)
export MEASURE_DEADLINE=$(( $(date +%s) + ${T_MEASURE:-$left} - 10 ))
ts "measure $* (up to ${T_MEASURE:-$left}s)" | tee -a "$OUT/setup.log"
# shellcheck disable=SC2086  # MEASURE_ARGS is a list of options
timeout -k 10 "${T_MEASURE:-$left}" "$PYTHON" -m dio.ops.gpu.measure "$@" --out "$OUT" ${MEASURE_ARGS:-} \
  > "$OUT/measure.log" 2>&1
rc=$?
echo "rc=$rc" >> "$OUT/measure.log"
grep -E '^RESULT|^\[|Error|error|Traceback|rc=' "$OUT/measure.log" | cut -c1-600 | tail -60
ts "done rc=$rc"
exit "$rc"
