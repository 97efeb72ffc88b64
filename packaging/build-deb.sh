#!/usr/bin/env bash
# Builds target/debian/lifeboat_<version>_<arch>.deb: the release binary,
# man pages and shell completions generated from the clap definitions, the
# systemd unit, the configuration as a root-only conffile, the monitoring
# files and the runbooks (see [package.metadata.deb] in cli/Cargo.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release -p lifeboat-cli
rm -rf target/generated
./target/release/lifeboat generate-assets --out target/generated
gzip -9n target/generated/man/*.1
mkdir -p target/debian
cargo deb -p lifeboat-cli --no-build --output target/debian/
ls -l target/debian/*.deb
