# syntax=docker/dockerfile:1
# The one waybill image: every service (`waybill serve --services X`), `waybill migrate`, and the
# CLI. Build from the repository root:  docker build -t waybill:0.1.0 .

# --- build ---------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace: cargo needs every member's manifest (and build.rs needs proto/) even to
# build one package. .dockerignore keeps target/ and other local state out of the context.
COPY . .
# Cache mounts keep the registry and the target directory between builds (BuildKit), so a code
# change recompiles only the workspace crates. The binary is copied out of the cache mount in the
# same step, because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p waybill \
    && cp target/release/waybill /waybill

# --- runtime -------------------------------------------------------------------------------
# glibc and libgcc (the binary is dynamically linked against them), CA certificates, no shell.
# The build stage is Debian 12 too, so the glibc versions match.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /waybill /waybill
# Numeric, so that Kubernetes' runAsNonRoot can verify it; the chart runs it as 10001 anyway
# (the process writes nothing and needs no passwd entry).
USER 65532:65532
# gRPC (services, health, reflection).
EXPOSE 50051
# The image's address must be reachable from outside its network namespace; the binary's own
# default is 127.0.0.1:50051.
ENV WAYBILL_LISTEN=0.0.0.0:50051
ENTRYPOINT ["/waybill"]
CMD ["serve"]
