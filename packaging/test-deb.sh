#!/usr/bin/env bash
# Inspects the .deb that build-deb.sh made: its metadata, every file it must
# install with the right permissions, the conffile; then unpacks it into a
# throwaway root and runs the packaged binary from there.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(ls target/debian/lifeboat_*.deb | head -1)
echo "checking $deb"
dpkg-deb --info "$deb" | tee /tmp/lifeboat-deb-info.txt
grep -q "Package: lifeboat" /tmp/lifeboat-deb-info.txt
grep -q "Section: admin" /tmp/lifeboat-deb-info.txt
contents=$(dpkg-deb --contents "$deb")
fail=0
need() { # mode-prefix path
    if ! grep -qE "^$1 .* \./$2\$" <<<"$contents"; then
        echo "MISSING or wrong mode: $2 (want $1)"; fail=1
    fi
}
need '-rwxr-xr-x' 'usr/bin/lifeboat'
need '-rw-r--r--' 'lib/systemd/system/lifeboat.service'
need '-rw-------' 'etc/lifeboat/lifeboat.toml'
need '-rw-r--r--' 'usr/share/man/man1/lifeboat.1.gz'
need '-rw-r--r--' 'usr/share/man/man1/lifeboat-agent.1.gz'
need '-rw-r--r--' 'usr/share/bash-completion/completions/lifeboat'
need '-rw-r--r--' 'usr/share/zsh/vendor-completions/_lifeboat'
need '-rw-r--r--' 'usr/share/fish/vendor_completions.d/lifeboat.fish'
need '-rw-r--r--' 'usr/share/lifeboat/prometheus/lifeboat-rules.yml'
need '-rw-r--r--' 'usr/share/lifeboat/grafana/lifeboat.json'
need '-rw-r--r--' 'usr/share/doc/lifeboat/runbooks/disaster-recovery.md'
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb --control "$deb" "$root/DEBIAN"
grep -qx /etc/lifeboat/lifeboat.toml "$root/DEBIAN/conffiles" || { echo "lifeboat.toml is not a conffile"; fail=1; }
dpkg-deb -x "$deb" "$root"
"$root/usr/bin/lifeboat" --version
LIFEBOAT_CONFIG="$root/etc/lifeboat/lifeboat.toml" "$root/usr/bin/lifeboat" config check
[ "$fail" = 0 ] && echo "deb OK"
exit "$fail"
