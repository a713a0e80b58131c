# Images for a cluster: `dynamo-rs` (the data plane: `dynamo frontend|sidecar|serve|bench`) and
# `dynamo-rs-operator` (the controller the Helm chart deploys). Both from one build stage:
#   docker build --target dataplane -t dynamo-rs:latest .
#   docker build --target operator  -t dynamo-rs-operator:latest .
# The test cluster builds the same two images without a container engine: hack/image.sh writes each
# as one OCI layer (the release binary, the libraries it links, /etc/passwd with nonroot 65532, /tmp,
# PATH, user 65532:65532, the same entrypoint) and imports it into the real node's containerd. The
# two must describe the same image: change one, change the other.
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
