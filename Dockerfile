# The image deploy/kubernetes runs: ghcr.io/tally-dev/tally:<version>, with
# /usr/local/bin/tally (broker, injector, ctl) and /usr/local/bin/tally-sidecar
# (the injected sidecar), as the fixed non-root uid/gid 65532.
#
#   docker build -t ghcr.io/tally-dev/tally:0.1.0 .

# The toolchain CI builds and tests with.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tally --bin tally-sidecar \
 && install -D -m 0755 target/release/tally /out/tally \
 && install -D -m 0755 target/release/tally-sidecar /out/tally-sidecar

# glibc and libgcc only (Debian 12, as the builder): no shell, no package
# manager. The :nonroot variant's user is 65532:65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tally /out/tally-sidecar /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tally"]
