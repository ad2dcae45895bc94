# shellcheck shell=bash
# Sourced by scripts/systemd-test, only with STASH_COST=1: what stashing costs the proxy itself
# (issue 26): keep-alive requests/s and new CONNECT tunnels/s through the unit with `[timeouts]
# stash_after` at its default (1 s) against "0" (never stash), in interleaved rounds (each a
# `systemctl reload`). Needs nginx (a fast origin) and the release examples (tunnel_bench).
# Prints the figures and their ratios; checks only that every request and tunnel succeeded.
[ "${STASH_COST:-0}" = 1 ] || return 0
TB=$ROOT/target/release/examples/tunnel_bench
if ! command -v nginx >/dev/null || [ ! -x "$TB" ]; then
  echo "      stash speed: skipped (needs nginx and cargo build --release --example tunnel_bench)"
  return 0
fi
mkdir -p "$W/ng"
cat > "$W/ng/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $W/ng/nginx.pid; error_log stderr;
events {}
http { access_log off; server { listen 127.0.0.1:9100; location / { return 200 "ok"; } } }
EOF
N nginx -p "$W/ng" -c "$W/ng/nginx.conf" >/dev/null 2>&1 &
wait_for 5 N curl -sf http://127.0.0.1:9100/ >/dev/null || fail "stash speed: nginx did not start"
X cp /etc/baton/baton.toml /etc/baton/baton.toml.speed
speed_config() {   # speed_config STASH_AFTER: the test's configuration with it, and 8443 tunnels
  X sh -c "sed 's/^\[timeouts\]\$/[timeouts]\nstash_after = \"$1\"/; s/^\[access\]\$/[access]\nconnect_ports = [443, 8443]/' \
    /etc/baton/baton.toml.speed > /etc/baton/baton.toml"
  timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT" || fail "stash speed: the reload with stash_after = $1 failed"
  wait_for 40 eval '[ "$(cgroup_procs | wc -l)" = 1 ]' || fail "stash speed: older generations did not drain"
}
declare -A KA TUN
for round in 1 2 3 4; do
  for mode in 1s 0; do
    speed_config "$mode"
    ka=$(N "$TB" http --proxy 127.0.0.1:8080 --url http://127.0.0.1:9100/ --conns 32 --secs 5)
    tun=$(N "$TB" open --proxy 127.0.0.1:8080 --target-port 8443 --conns 32 --secs 5)
    req=$(echo "$ka" | "$PY" -c 'import json,sys; j=json.load(sys.stdin); print(j["requests"], j["failed"])')
    opened=$(echo "$tun" | "$PY" -c 'import json,sys; j=json.load(sys.stdin); print(j["per_sec"], j["errors"])')
    echo "      round $round, stash_after = $mode: keep-alive $((${req% *} / 5)) req/s (${req#* } failed), tunnels ${opened% *}/s (${opened#* } errors)"
    KA[$mode]="${KA[$mode]:-} $((${req% *} / 5))"
    TUN[$mode]="${TUN[$mode]:-} ${opened% *}"
    [ "${req#* }" = 0 ] && [ "${opened#* }" = 0 ] || fail "stash speed: failures with stash_after = $mode"
  done
done
"$PY" - "${KA[1s]}" "${KA[0]}" "${TUN[1s]}" "${TUN[0]}" <<'EOF'
import statistics, sys
ka_on, ka_off, t_on, t_off = ([float(x) for x in a.split()] for a in sys.argv[1:5])
m = statistics.median
print(f"      stash on/off, medians of 4: keep-alive {m(ka_on):.0f}/{m(ka_off):.0f} req/s = {m(ka_on)/m(ka_off):.3f}x "
      f"(target >= 0.97x); new tunnels {m(t_on):.0f}/{m(t_off):.0f} per s = {m(t_on)/m(t_off):.3f}x (target >= 0.9x)")
EOF
X mv /etc/baton/baton.toml.speed /etc/baton/baton.toml
timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT" || fail "stash speed: the reload back failed"
N sh -c "kill \$(cat $W/ng/nginx.pid)" 2>/dev/null
check "stash speed: the unit served throughout" eval 'state_is active/running && get_ok'
