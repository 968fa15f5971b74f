# Multi-stage build of the flywheel gateway.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY .cargo .cargo
COPY src src
COPY benches benches
RUN cargo build --release --locked --bin flywheel

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
RUN useradd --system --create-home --home-dir /var/lib/flywheel flywheel
COPY --from=build /src/target/release/flywheel /usr/local/bin/flywheel
COPY config /etc/flywheel
USER flywheel
WORKDIR /var/lib/flywheel
EXPOSE 8080
# The default config listens on loopback; in a container, listen on all interfaces and configure API keys.
ENTRYPOINT ["flywheel"]
CMD ["serve", "--config", "/etc/flywheel/flywheel.toml", "--listen", "0.0.0.0:8080"]
