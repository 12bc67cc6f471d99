# Multi-stage builds of mull.
#
#   CPU:  docker build -t mull .
#   CUDA: docker build -t mull:cuda --target cuda .
#
# Run with the model mounted, or let the server fetch the default model
# into /models on first start (needs python3 and pip, which the CPU image
# has):
#   docker run -p 8080:8080 -v $PWD/models:/models mull

ARG RUST_VERSION=1.95

# --- CUDA build ------------------------------------------------------------
FROM nvidia/cuda:12.4.1-devel-ubuntu22.04 AS build-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config libssl-dev cmake libclang-dev \
    && rm -rf /var/lib/apt/lists/*
ARG RUST_VERSION
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
ENV RUSTFLAGS="-C target-cpu=x86-64-v3"
RUN cargo build --release --features cuda --bin mull

FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cuda /src/target/release/mull /usr/local/bin/mull
COPY config/mull.toml /etc/mull/mull.toml
ENV MULL_CONFIG=/etc/mull/mull.toml \
    MULL_HOST=0.0.0.0 \
    MULL_MODELS_DIR=/models \
    MULL_DEVICE=cuda \
    MULL_TRACES_PATH=/data/mull-traces.db
VOLUME /models /data
EXPOSE 8080
ENTRYPOINT ["mull", "serve"]

# The CPU image is the last stage, so a plain `docker build` produces it.
# --- CPU build -------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build-cpu
# llama-cpp-sys-2 builds llama.cpp with CMake and its bindings with libclang.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake libclang-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# A portable baseline (AVX2, FMA, F16C) instead of the build host's CPU, so
# candle's vectorized kernels are compiled in and the image runs on any
# x86-64-v3 machine. llama.cpp follows the same baseline, without AMX.
ENV RUSTFLAGS="-C target-cpu=x86-64-v3"
RUN cargo build --release --bin mull

FROM debian:bookworm-slim AS cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build-cpu /src/target/release/mull /usr/local/bin/mull
COPY config/mull.toml /etc/mull/mull.toml
ENV MULL_CONFIG=/etc/mull/mull.toml \
    MULL_HOST=0.0.0.0 \
    MULL_MODELS_DIR=/models \
    MULL_TRACES_PATH=/data/mull-traces.db
VOLUME /models /data
EXPOSE 8080
ENTRYPOINT ["mull", "serve"]

