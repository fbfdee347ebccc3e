# syntax=docker/dockerfile:1
# Builds every nestless binary and ships them with config/.
#
#   docker build -t nestless .
#   # host agent (needs the host's network namespace, /dev/net/tun and the QMP sockets):
#   docker run --rm --net=host --privileged -v /etc/nestless:/etc/nestless \
#       -v /run/nestless:/run/nestless -v /var/lib/nestless:/var/lib/nestless nestless
#   # binaries for a VM image (shim, CNI plugin): copy them out of the image
#   docker create --name x nestless && docker cp x:/usr/local/bin/. ./bin && docker rm x

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not refetch them.
COPY Cargo.toml Cargo.lock ./
COPY protos protos
COPY netagent netagent
COPY shim shim
COPY tests tests
RUN cargo build --release --locked \
        -p nestless-netagent -p containerd-shim-nestless-v2
# One shim runs per pod: linked statically (glibc), it keeps no shared library pages
# resident (see docs/benchmarks.md). --target keeps the flag off build scripts and macros.
RUN host=$(rustc -vV | sed -n 's/^host: //p') \
    && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
        --target "$host" -p containerd-shim-nestless-v2 --bin containerd-shim-nestless-v2 \
    && cp "target/$host/release/containerd-shim-nestless-v2" target/release/ \
    && strip target/release/nestless-netagent target/release/nestlessctl \
        target/release/containerd-shim-nestless-v2 target/release/nestless-cni

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/nestless-netagent \
                  /src/target/release/nestlessctl \
                  /src/target/release/containerd-shim-nestless-v2 \
                  /src/target/release/nestless-cni \
                  /usr/local/bin/
COPY config/ /usr/share/nestless/config/
ENTRYPOINT ["/usr/local/bin/nestless-netagent"]
CMD ["--config", "/etc/nestless/netagent.toml"]
