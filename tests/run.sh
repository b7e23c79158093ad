#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root: installs what it needs, then ruff + mypy + pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use for real: git, gpg, tar with xz/bzip2/zstd, rsync (emerge-webrsync),
# debootstrap (the stand-in stage for chroot builds), util-linux (unshare, mount), lighttpd with
# mod_openssl and wget (the client-certificate endpoints and a client of them).
pkgs=(git gnupg tar xz-utils bzip2 zstd rsync debootstrap util-linux ca-certificates lighttpd lighttpd-mod-openssl wget shellcheck
      postgresql iproute2)  # the build queue on PostgreSQL (a throwaway cluster per run); ip netns: build hosts
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
mypy  # strict for snapshotter/ and chroot/: [tool.mypy] in pyproject.toml
exec pytest "$@"
