# Shared by scripts/run and scripts/test: find Python >= 3.12 and keep .venv installed.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"

python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null
}

find_python() {
    local candidates=()
    [ -n "${CUSTODY_PYTHON:-}" ] && candidates+=("$CUSTODY_PYTHON")
    candidates+=(python3.14 python3.13 python3.12 python3)
    if command -v pyenv >/dev/null 2>&1; then
        local root; root=$(pyenv root)
        candidates+=($(ls -d "$root"/versions/3.1[2-9]*/bin/python3 2>/dev/null | sort -rV))
    fi
    candidates+=(/usr/local/bin/python3.12 /usr/bin/python3.12 /opt/homebrew/bin/python3.12)
    if command -v uv >/dev/null 2>&1; then
        candidates+=("$(uv python find '>=3.12' 2>/dev/null)")
    fi
    local c
    for c in "${candidates[@]}"; do
        [ -n "$c" ] || continue
        if command -v "$c" >/dev/null 2>&1 && python_ok "$c"; then
            command -v "$c"
            return 0
        fi
    done
    cat >&2 <<'MSG'
Custody needs Python 3.12 or newer (mitmproxy 12 requires it), and none was found.
Install one, then run this again, for example:
  Debian/Ubuntu:  sudo apt-get install python3.12 python3.12-venv
  macOS:          brew install python@3.12
  pyenv:          pyenv install 3.12
  uv:             uv python install 3.12
or point CUSTODY_PYTHON at an existing python3.12+ binary.
MSG
    return 1
}

# ensure_venv run|test: create .venv with Python >= 3.12 and install the project (editable),
# again whenever pyproject.toml changes.
ensure_venv() {
    local extras=$1 python
    if [ -x "$VENV/bin/python" ] && ! python_ok "$VENV/bin/python"; then
        echo "Recreating .venv: it was made with Python < 3.12." >&2
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        python=$(find_python) || exit 1
        echo "Creating .venv with $python ($("$python" --version))" >&2
        "$python" -m venv "$VENV"
    fi
    local stamp="$VENV/.custody-installed-$extras"
    local want; want=$(sha256sum < "$ROOT/pyproject.toml" | cut -d' ' -f1)
    # an install with the test extras covers a plain run too
    if [ "$extras" = run ] && [ "$(cat "$VENV/.custody-installed-test" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "Installing Custody and its dependencies into .venv (log: .venv/install.log) ..." >&2
        if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check --upgrade pip \
               && "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[$extras]"; } \
               > "$VENV/install.log" 2>&1; then
            tail -n 30 "$VENV/install.log" >&2
            echo "Installing into .venv failed; the whole log is in .venv/install.log" >&2
            exit 1
        fi
        echo "$want" > "$stamp"
    fi
}

# ensure_packages CMD=PKG ...: install missing Debian packages when running as root.
ensure_packages() {
    local missing=() pair cmd pkg
    for pair in "$@"; do
        cmd=${pair%%=*}; pkg=${pair#*=}
        if [ -e "$cmd" ] || command -v "$cmd" >/dev/null 2>&1; then continue; fi
        missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "Installing system packages: ${missing[*]}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2 \
            || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2; }
    else
        echo "Missing system packages: ${missing[*]} (install them, or run as root to have this script do it)" >&2
        return 1
    fi
}

# ensure_kubectl: kubectl 1.30 or newer (exec over WebSocket). Installed from a Debian
# repository when missing and root: `kubectl` where the Kubernetes or Google Cloud
# repository is configured, else Debian's own `kubernetes-client`.
ensure_kubectl() {
    if ! command -v kubectl >/dev/null 2>&1; then
        ensure_packages kubectl=kubectl 2>/dev/null || ensure_packages kubectl=kubernetes-client || return 1
    fi
    local minor
    minor=$(kubectl version --client -o json 2>/dev/null | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+"))' || echo 0)
    if [ "${minor:-0}" -lt 30 ]; then
        echo "kubectl 1.$minor is too old for the Kubernetes tests (exec needs 1.30+, WebSocket):" >&2
        echo "  see https://kubernetes.io/docs/tasks/tools/install-kubectl-linux/ (the pkgs.k8s.io apt repository)" >&2
        return 1
    fi
}

# ensure_postgres: a PostgreSQL server (initdb, pg_ctl, pgbench, in Debian's
# /usr/lib/postgresql/N/bin layout or on PATH) and psql, for pg_bridge's tests and sample.
ensure_postgres() {
    ensure_packages psql=postgresql-client || return 1
    if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null 2>&1; then
        return 0
    fi
    ensure_packages /usr/lib/postgresql/any/bin/initdb=postgresql
}

# port_owner PORT: who listens on PORT ("mitmdump (pid 1234)"), when ss can tell.
port_owner() {
    command -v ss >/dev/null 2>&1 || return 0
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:(("[^"]*",pid=[0-9]*' | head -n 1 \
        | sed 's/users:(("\([^"]*\)",pid=\([0-9]*\)/\1 (pid \2)/'
}

# require_free_ports WHAT PORT...: exit with one line naming the first port in use and its owner.
require_free_ports() {
    local what=$1 p owner; shift
    for p in "$@"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            owner=$(port_owner "$p")
            echo "$what: port $p is in use${owner:+ by $owner}; stop it (or pass --port for the gateway's)" >&2
            exit 1
        fi
    done
}

# single_copy LOCKFILE WHAT: exit with one line when another copy holds the lock (kept until exit).
single_copy() {
    exec 9>>"$1"
    if ! flock -n 9; then
        echo "$2: another copy is already running from this checkout (pid $(cat "$1.pid" 2>/dev/null || echo '?')); stop it first" >&2
        exit 1
    fi
    echo $$ > "$1.pid"
}

# ensure_pg_clients: the client libraries of other languages pg_bridge's tests run against
# it: the PostgreSQL JDBC driver (Debian's, with a JRE) and node-postgres (npm's `pg`, into
# .cache/node; nothing is vendored).
ensure_pg_clients() {
    ensure_packages java=default-jre-headless node=nodejs npm=npm || return 1
    if [ ! -e /usr/share/java/postgresql.jar ]; then
        ensure_packages /usr/share/java/postgresql.jar=libpostgresql-jdbc-java || return 1
    fi
    if [ ! -d "$ROOT/.cache/node/node_modules/pg" ]; then
        npm install --prefix "$ROOT/.cache/node" --no-save --no-audit --no-fund pg@8 >&2
    fi
}
