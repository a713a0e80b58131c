# Images for a cluster: `dynamo-rs` (the data plane: `dynamo frontend|sidecar|serve|bench`) and
# `dynamo-rs-operator` (the controller the Helm chart deploys). Both from one build stage:
#   docker build --target dataplane -t dynamo-rs:latest .
#   docker build --target operator  -t dynamo-rs-operator:latest .
# (This repository's CI machines have no container engine; the binaries themselves are what the
# tests exercise.)
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin dynamo --bin dynamo-operator

FROM gcr.io/distroless/cc-debian12:nonroot AS dataplane
COPY --from=build /src/target/release/dynamo /usr/local/bin/dynamo
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dynamo"]

FROM gcr.io/distroless/cc-debian12:nonroot AS operator
COPY --from=build /src/target/release/dynamo-operator /usr/local/bin/dynamo-operator
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/dynamo-operator"]
