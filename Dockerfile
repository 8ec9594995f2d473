# Build stage: compile the release binary with the dependency layer cached separately.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
# gate-bench is a workspace member: its manifest must be there, its code need not be.
COPY bench/Cargo.toml ./bench/Cargo.toml
RUN mkdir -p src bench/src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked -p konstruct-gate && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p konstruct-gate --bin konstruct-gate

# Runtime stage: a small image with only the binary and CA certificates, run as non-root.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home gate
COPY --from=build /src/target/release/konstruct-gate /usr/local/bin/konstruct-gate
# The configuration is read from a fixed path (mount a ConfigMap over /etc/konstruct-gate
# in Kubernetes), and the operations endpoint listens on every interface, so probes and
# Prometheus reach it from outside the container.
COPY config/default.toml /etc/konstruct-gate/gate.toml
ENV KONSTRUCT_GATE_CONFIG=/etc/konstruct-gate/gate.toml \
    KONSTRUCT_GATE__HTTP__LISTEN=0.0.0.0:9464
USER 10001
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/konstruct-gate"]
CMD ["run"]
