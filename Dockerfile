# Builds every nestless binary and ships them with config/.
#
#   docker build -t nestless .
#   # without a registry: any image with Rust >= 1.89, cargo and a C linker as RUST_IMAGE,
#   # and a glibc at least as new as its own as BASE_IMAGE (tests/tests/dockerfile.rs builds
#   # both from Debian packages: debootstrap + docker import):
#   docker build --build-arg RUST_IMAGE=my-rust --build-arg BASE_IMAGE=my-debian -t nestless .
#   # host agent (needs the host's network namespace, /dev/net/tun and the QMP sockets):
#   docker run --rm --net=host --privileged -v /etc/nestless:/etc/nestless \
#       -v /run/nestless:/run/nestless -v /var/lib/nestless:/var/lib/nestless nestless
#   # binaries for a VM image (shim, CNI plugin): copy them out of the image
#   docker create --name x nestless && docker cp x:/usr/local/bin/. ./bin && docker rm x

ARG RUST_IMAGE=rust:1.95-bookworm
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Dependencies first, so that a source change does not refetch them.
COPY Cargo.toml Cargo.lock ./
# Every member of the workspace (cargo reads them all), built: the agent and the shim.
COPY protos protos
COPY model model
COPY planner planner
COPY netagent netagent
COPY shim shim
COPY tests tests
# Linked statically (glibc): one shim runs per pod, and keeps no shared library pages
# resident (see docs/benchmarks.md); the binaries run on any glibc system. --target keeps
# the flag off build scripts and macros. One build for all four binaries. Without the
# agent's "libvirt" feature: libvirt.so cannot be linked statically, so this agent serves
# qemu and netns VMs; a libvirt host builds its agent with libvirt-dev (docs/install.md).
RUN host=$(rustc -vV | sed -n 's/^host: //p') \
    && RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked \
        --no-default-features \
        --target "$host" -p nestless-netagent -p containerd-shim-nestless-v2 \
    && mkdir -p /out \
    && for b in nestless-netagent nestlessctl containerd-shim-nestless-v2 nestless-cni; do \
        cp "target/$host/release/$b" /out/ && strip "/out/$b"; done

FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends iproute2 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/nestless-netagent /out/nestlessctl \
                  /out/containerd-shim-nestless-v2 /out/nestless-cni /usr/local/bin/
COPY config/ /usr/share/nestless/config/
ENTRYPOINT ["/usr/local/bin/nestless-netagent"]
CMD ["--config", "/etc/nestless/netagent.toml"]
