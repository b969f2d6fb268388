# One image with all five binaries: they share every dependency, so one build
# serves them all and compose picks the binary per service.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p keel-auth -p keel-jobs -p keel-memory -p keel-worker -p keel-console

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 keel
COPY --from=build /src/target/release/keel-auth /src/target/release/keel-jobs \
     /src/target/release/keel-memory /src/target/release/keel-worker \
     /src/target/release/keel-console /usr/local/bin/
USER keel
