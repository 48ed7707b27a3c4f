#!/usr/bin/env bash
# Install registry-gateway on a plain server, as a systemd service:
#   sudo deploy/install.sh [--routes routes.yaml]
# builds the wheel from this checkout (or takes --wheel FILE), installs it into a virtualenv
# at /opt/registry-gateway, puts routes.yaml (kept if there), certs/ and registry-gateway.env
# into /etc/registry-gateway, creates the registry-gateway user, installs the unit and
# enables and (re)starts it. Run it again to upgrade: the configuration and the cache stay.
#
# --root DIR installs the same tree under DIR, with DIR in every path the unit names, and
# touches nothing outside it (no user, no systemctl): a tree that runs in place (tests, a
# second instance). pip follows the usual PIP_* variables (PIP_INDEX_URL for a mirror).
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: install.sh [--root DIR] [--prefix DIR] [--routes FILE] [--wheel FILE] [--python PY]
                  [--args "SERVE OPTIONS"] [--no-start]
  --root DIR     install under DIR instead of / (paths in the unit included)
  --prefix DIR   the virtualenv (default ROOT/opt/registry-gateway)
  --routes FILE  the routes.yaml to install if none is there yet (default: this checkout's)
  --wheel FILE   install this wheel instead of building one from this checkout
  --python PY    the Python (3.11 or newer) that makes the virtualenv (default python3)
  --args "..."   REGISTRY_GATEWAY_ARGS of a new registry-gateway.env (the listeners;
                 default "--tls-listen 0.0.0.0:443 --listen 0.0.0.0:80 --redirect-http")
  --no-start     install and enable, but do not (re)start the service
USAGE
}

here=$(cd "$(dirname "$0")/.." && pwd)
root=/ prefix= routes="$here/routes.yaml" wheel= python=python3 start=1
args="--tls-listen 0.0.0.0:443 --listen 0.0.0.0:80 --redirect-http"
while (($#)); do
  case "$1" in
    --root) root=$2; shift 2 ;;
    --prefix) prefix=$2; shift 2 ;;
    --routes) routes=$2; shift 2 ;;
    --wheel) wheel=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --args) args=$2; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done

root=$(realpath -m "$root")
base=${root%/}                       # "" for /
prefix=$(realpath -m "${prefix:-$base/opt/registry-gateway}")
conf=$base/etc/registry-gateway
data=$base/var/lib/registry-gateway
unitdir=$base/etc/systemd/system
system=0; [ "$root" = / ] && system=1
say() { echo "install.sh: $*"; }

if ((system)) && [ "$(id -u)" != 0 ]; then
  echo "install.sh: installing into / needs root (or use --root DIR)" >&2; exit 1
fi
[ -f "$routes" ] || { echo "install.sh: no routes file $routes" >&2; exit 1; }

# 1. The virtualenv and the wheel in it (an upgrade replaces the gateway, keeps the venv).
if [ ! -x "$prefix/bin/python" ]; then
  say "virtualenv $prefix"
  "$python" -m venv "$prefix"
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
if [ -z "$wheel" ]; then
  say "building the wheel from $here"
  "$prefix/bin/python" -m pip wheel --quiet --no-deps --wheel-dir "$tmp" "$here"
  wheel=$(ls "$tmp"/registry_gateway-*.whl)
fi
say "installing $(basename "$wheel")"
"$prefix/bin/python" -m pip install --quiet --upgrade "$wheel"
# The same version number again (a rebuilt checkout) is installed too.
"$prefix/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
"$prefix/bin/registry-gateway" --version
mkdir -p "$prefix/share/doc"
[ -f "$here/docs/operations.md" ] && install -m 0644 "$here/docs/operations.md" "$prefix/share/doc/"

# 2. Its user (a real server only).
if ((system)) && ! id registry-gateway >/dev/null 2>&1; then
  say "creating the system user registry-gateway"
  useradd --system --user-group --home-dir /var/lib/registry-gateway --no-create-home \
    --shell /usr/sbin/nologin registry-gateway
fi

# 3. Configuration: kept when it is there, so an upgrade never loses it.
install -d -m 0755 "$conf"
install -d -m 0750 "$conf/certs"
if [ -e "$conf/routes.yaml" ]; then
  say "keeping $conf/routes.yaml"
else
  install -m 0640 "$routes" "$conf/routes.yaml"
  say "installed $conf/routes.yaml (from $routes)"
fi
if [ ! -e "$conf/registry-gateway.env" ]; then
  cat >"$conf/registry-gateway.env" <<ENV
# Command-line options of \`registry-gateway serve\` for the service (listeners, metrics);
# \`systemctl restart registry-gateway\` applies a change. Secrets that routes.yaml names
# with password_env go here too (this file is readable by root and the service only).
REGISTRY_GATEWAY_ARGS=$args
ENV
  chmod 0640 "$conf/registry-gateway.env"
fi
if ((system)); then
  chgrp registry-gateway "$conf/certs" "$conf/routes.yaml" "$conf/registry-gateway.env"
fi
((system)) || install -d -m 0750 "$data"   # systemd makes it (StateDirectory=) on a server

# 4. The unit, naming the paths of this install.
install -d "$unitdir"
sed -e "s|/opt/registry-gateway|$prefix|g" -e "s|/etc/registry-gateway|$conf|g" \
    -e "s|/var/lib/registry-gateway|$data|g" "$here/deploy/registry-gateway.service" \
  >"$tmp/registry-gateway.service"
if ((!system)); then
  # StateDirectory= always means /var/lib: under another root, name the directory instead.
  sed -i -e "s|^StateDirectory=.*|ReadWritePaths=$data|" -e "/^StateDirectoryMode=/d" \
    "$tmp/registry-gateway.service"
fi
install -m 0644 "$tmp/registry-gateway.service" "$unitdir/registry-gateway.service"
say "installed $unitdir/registry-gateway.service"

# 5. Enabled and (re)started, where this is the machine's systemd.
"$prefix/bin/registry-gateway" check --config "$conf/routes.yaml" >/dev/null
if ((system)) && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable registry-gateway.service
  if ((start)); then
    systemctl restart registry-gateway.service
    systemctl --no-pager --lines=5 status registry-gateway.service || true
  fi
else
  say "not started here; on a server: systemctl daemon-reload && systemctl enable --now registry-gateway"
fi
say "done. Certificates go into $conf/certs (see certs/README.md); logs: journalctl -u registry-gateway"
