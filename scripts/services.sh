#!/usr/bin/env bash
# Start the local services the integration tests use, each only if it is not answering:
# PostgreSQL on 5432, Redis on 6379, RabbitMQ on 5672. Idempotent; CI runs it before the tests.
set -u

wait_for() {  # wait_for NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then echo "services: $name is up"; return 0; fi
    sleep 1
  done
  echo "services: $name did not come up within ${seconds}s" >&2
  return 1
}

if command -v pg_isready >/dev/null; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    wait_for postgresql 30 pg_isready -q -h 127.0.0.1 -p 5432
  fi
else
  echo "services: no PostgreSQL client here; the tests use the embedded server" >&2
fi

if command -v redis-server >/dev/null; then
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
    wait_for redis 15 redis-cli -h 127.0.0.1 -p 6379 ping
  fi
fi

if command -v rabbitmq-server >/dev/null; then
  if ! timeout 20 rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    rabbitmq-server -detached
    wait_for rabbitmq 60 timeout 10 rabbitmq-diagnostics -q ping
  fi
fi

# A full disk fails the tests far from their cause (a write error here, RabbitMQ's disk alarm
# blocking every publisher there): say so first
for dir in . "${TMPDIR:-/tmp}"; do
  free_mb=$(df -Pm "$dir" | awk 'NR==2 {print $4}')
  if [ "${free_mb:-0}" -lt 10240 ]; then
    echo "services: only ${free_mb} MB free on $(df -P "$dir" | awk 'NR==2 {print $6}'); an install (6.5 GB) and a test run need about 10 GB" >&2
  fi
done
if command -v rabbitmq-diagnostics >/dev/null && ! timeout 20 rabbitmq-diagnostics -q check_alarms >/dev/null 2>&1; then
  echo "services: RabbitMQ reports an alarm (rabbitmq-diagnostics alarms); it blocks publishers" >&2
fi

# Headless Chromium renders `rollscan report` pages in tests/test_roll_report.py (that check is
# skipped without it). Best effort: installed only as root with apt-get; a failure goes on.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "services: installing chromium (apt-get)"
  if DEBIAN_FRONTEND=noninteractive timeout 900 sh -c \
      'apt-get update -qq && apt-get install -y -qq chromium' >/dev/null 2>&1; then
    echo "services: chromium installed"
  else
    echo "services: could not install chromium; the report rendering test will be skipped" >&2
  fi
fi
exit 0
