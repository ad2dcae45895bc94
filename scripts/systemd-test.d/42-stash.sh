# shellcheck shell=bash
# Sourced by scripts/systemd-test. A crash loses no connection (issue 26): tunnels and idle
# keep-alive connections that lived [timeouts] stash_after (1 s) are in systemd's fd store;
# `kill -9` of the serving generation, systemd restarts it (Restart=on-failure), and the new
# first generation takes them back: each tunnel echoes on intact (equal SHA-256 at both
# ends), each idle connection's next request is answered, and the store then holds only what
# still lives. STASH_ROUNDS crashes in a row, by SIGKILL, SIGSEGV and SIGABRT in turn (CI runs
# one of each, small; the issue's figure is STASH_ROUNDS=10 STASH_TUNNELS=50 STASH_IDLE=1000).
STASH_TUNNELS=${STASH_TUNNELS:-20}
STASH_IDLE=${STASH_IDLE:-50}
STASH_ROUNDS=${STASH_ROUNDS:-3}
cat > "$W/echo.py" <<'EOF'
# Loopback echo origin for the tunnels: every byte back, until the client's FIN.
import socket, sys, threading
def serve(c):
    with c:
        while True:
            b = c.recv(65536)
            if not b:
                c.shutdown(socket.SHUT_WR)
                return
            c.sendall(b)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(512)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
cat > "$W/stash_client.py" <<'EOF'
# (The echo origin listens on 443: the shipped configuration's connect_ports.)
# Tunnels that echo continuously and idle keep-alive connections through the proxy. Phase 1:
# open all, keep the tunnels flowing, write W/stash.ready once all have lived 1.5 s. Phase 2
# (W/stash.go appears: the restart is over): each tunnel sends one more second, half-closes,
# reads to the end; each idle connection sends its next request. One result line each.
import hashlib, os, socket, sys, threading, time
W, proxy_port, echo_port, origin_port, n_tun, n_idle = sys.argv[1], *map(int, sys.argv[2:7])
go = lambda: os.path.exists(W + "/stash.go")
out, lock = [], threading.Lock()
def say(line):
    with lock:
        out.append(line)
def dial(i):
    # Spread over 8 source addresses: the shipped configuration allows 256 connections a client.
    return socket.create_connection(("127.0.0.1", proxy_port), timeout=30, source_address=(f"127.0.0.{2 + i % 8}", 0))
def connect(i, target):
    s = dial(i)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        b = s.recv(1)
        if not b:
            raise OSError("closed before the CONNECT answer")
        head += b
    if b" 200" not in head.split(b"\r\n")[0]:
        raise OSError("CONNECT answered " + head.split(b"\r\n")[0].decode())
    return s
def tunnel(i):
    try:
        s = connect(i, f"127.0.0.1:{echo_port}")
        sent, got, n_sent, n_got = hashlib.sha256(), hashlib.sha256(), 0, 0
        def reader():
            nonlocal n_got
            while True:
                b = s.recv(65536)
                if not b:
                    return
                got.update(b); n_got += len(b)
        r = threading.Thread(target=reader); r.start()
        end = None
        while end is None or time.time() < end:
            block = os.urandom(16384)
            s.sendall(block); sent.update(block); n_sent += len(block)
            time.sleep(0.02)
            if end is None and go():
                end = time.time() + 1.0
        s.shutdown(socket.SHUT_WR)
        r.join(30)
        ok = not r.is_alive() and sent.hexdigest() == got.hexdigest() and n_sent == n_got
        say(f"tunnel {i} {'ok' if ok else 'BAD'} sent={n_sent} got={n_got} sha={sent.hexdigest()[:12]}/{got.hexdigest()[:12]}")
    except OSError as e:
        say(f"tunnel {i} BAD {e}")
def get(s):
    s.sendall(f"GET http://127.0.0.1:{origin_port}/ HTTP/1.1\r\nHost: 127.0.0.1:{origin_port}\r\n\r\n".encode())
    data = b""
    while not (b"\r\n\r\n" in data and data.endswith(b"ok")):
        b = s.recv(4096)
        if not b:
            raise OSError("closed: " + repr(data[:60]))
        data += b
    return data.split(b"\r\n")[0].decode()
def idle(i):
    try:
        s = dial(i)
        get(s)
        while not go():
            time.sleep(0.05)
        status = get(s)
        say(f"idle {i} {'ok' if ' 200' in status else 'BAD'} {status}")
    except OSError as e:
        say(f"idle {i} BAD {e}")
threads = [threading.Thread(target=tunnel, args=(i,)) for i in range(n_tun)]
threads += [threading.Thread(target=idle, args=(i,)) for i in range(n_idle)]
for t in threads:
    t.start()
time.sleep(1.5)
open(W + "/stash.ready", "w").close()
for t in threads:
    t.join(90)
open(W + "/stash.out", "w").write("\n".join(out) + "\n")
EOF
N "$PY" "$W/echo.py" 443 >/dev/null 2>&1 &   # stopped by the cleanup, with all run from $W
wait_for 5 N "$PY" -c 'import socket; socket.create_connection(("127.0.0.1", 443), 1)' ||
  fail "stash: the echo origin did not start"
# The tunnels echo random bytes, not TLS: the shipped configuration's [access] no_sni = "deny"
# would refuse them (and the idle connections would then sit out header_read's 10 s waiting
# for the store's count). The later steps' tunnels are not TLS either.
X sh -c 'sed -i "s/^\[access\]\$/[access]\nsni = \"ignore\"/" /etc/baton/baton.toml'
timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT" || fail "stash: the reload with sni = ignore failed"
stash_round() {   # stash_round SIG: one crash by SIG, and what it must not lose
  local SIG=$1
  # 40-fdstore.sh left generations draining: the crash must meet the serving one alone.
  wait_for 40 eval '[ "$(cgroup_procs | wc -l)" = 1 ]' || fail "stash: older generations did not drain"
  STORED0=$(show NFileDescriptorStore)
  rm -f "$W"/stash.*
  N bash -c "ulimit -n 20000; exec $PY $W/stash_client.py $W 8080 443 9000 $STASH_TUNNELS $STASH_IDLE" > "$W/stash.client" 2>&1 &
  CLIENT=$!
  wait_for 120 test -e "$W/stash.ready" || fail "stash: the client did not open its connections"
  # The serving generation's table is in STORED0 already (a crash swaps it for the new one's).
  want=$((STORED0 + 6 * STASH_TUNNELS + STASH_IDLE))
  check "stash: $STASH_TUNNELS tunnels (6 fds each) and $STASH_IDLE idle connections in the fd store: $(show NFileDescriptorStore) fds (was $STORED0)" \
    eval 'wait_for 10 eval "[ \"\$(show NFileDescriptorStore)\" = $want ]"'
  SERVING=$(show MainPID)
  RESTARTS=$(show NRestarts)
  X kill -"$SIG" "$SERVING"
  # Rust's runtime catches SIGSEGV and SIGBUS (to report a stack overflow): one sent by kill(2)
  # finds no guard-page fault, so its handler restores the default action and returns, and
  # the process lives on. A real fault would fault again; the second signal stands for that.
  if [ "$SIG" = SEGV ] && ! wait_for 2 gone "$SERVING"; then X kill -SEGV "$SERVING"; fi
  wait_for 20 eval '[ "$(show NRestarts)" -gt "$RESTARTS" ] && state_is active/running' ||
    fail "stash: the unit was not restarted"
  NEW=$(show MainPID)
  check "stash: kill -$SIG of $SERVING, restarted as $NEW, which took the connections back" \
    eval 'wait_for 10 eval "X journalctl -u \"$UNIT\" _PID=$NEW --no-pager -o cat | grep -q \"taken back from systemd.s fd store\""'
  X journalctl -u "$UNIT" _PID="$NEW" --no-pager -o verbose | grep -E '^ *(TUNNELS|CONNECTIONS|REFUSED|FOUND|UNMATCHED|TORN)=' |
    tr '\n' ' ' | sed 's/^/      taken back: /; s/$/\n/'
  # Why any was dropped (a refused adoption names its reason).
  X journalctl -u "$UNIT" _PID="$NEW" --no-pager -o cat | grep -m 5 "dropped" | sed 's/^/      | /'
  touch "$W/stash.go"
  wait "$CLIENT"
  TUN_OK=$(grep -c '^tunnel .* ok ' "$W/stash.out" 2>/dev/null)
  IDLE_OK=$(grep -c '^idle .* ok ' "$W/stash.out" 2>/dev/null)
  check "stash: $TUN_OK of $STASH_TUNNELS tunnels echoed on across the crash, equal SHA-256 at both ends" \
    eval '[ "$TUN_OK" = "$STASH_TUNNELS" ]'
  check "stash: $IDLE_OK of $STASH_IDLE idle keep-alive connections answered after the crash" \
    eval '[ "$IDLE_OK" = "$STASH_IDLE" ]'
  grep -v ' ok ' "$W/stash.out" 2>/dev/null | head -5 | sed 's/^/      | /'
  check "stash: with the client gone the fd store holds what it held before ($STORED0 + the new table): $(show NFileDescriptorStore)" \
    eval 'wait_for 10 eval "[ \"\$(show NFileDescriptorStore)\" = $((STORED0)) ]"'
  check "stash: the restarted generation serves" get_ok
}
for round in $(seq 1 "$STASH_ROUNDS"); do
  stash_round "$(echo KILL SEGV ABRT | cut -d' ' -f$(( (round - 1) % 3 + 1 )))"
done
