#!/usr/bin/env bash
# Idempotent setup of a fresh Debian 12 / Ubuntu 24.04 machine for development, the demo and the tests:
# system packages (as root), then .venv on the distribution's python3 (so python3-gi, which pydbus
# needs, comes from the distribution, exactly as in the .deb), then mi50d in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3 python3-venv python3-gi python3-dev  # runtime python + pydbus's GObject bindings
    build-essential cmake git pkg-config          # building llama-server (mi50ctl build-llama)
    dbus systemd-container debootstrap            # the end-to-end test under real systemd
    dpkg-dev debhelper dh-virtualenv fakeroot     # building the .deb
    util-linux procps iproute2 curl ntfs-3g       # nsenter, ps, ss, curl, a real NTFS mount in tests
    prometheus                                    # a real Prometheus scraping /metrics in tests
    nftables                                      # enforcing an rpc-worker's allow (and its tests)
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: missing system packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The tests start their own Prometheus on loopback; the package's service is not wanted.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi

if [ ! -x .venv/bin/python ]; then
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.mi50d-setup-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
