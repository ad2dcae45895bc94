# shellcheck shell=bash
# Sourced by scripts/systemd-test, only with STASH_COST=1 (it takes a minute and loads the
# machine): PID 1's CPU while baton keeps connections in its fd store (issue 26). Prints
# figures, checks only that the unit stays up. Needs 42-stash.sh's echo origin on 443.
# - idle: nothing happens (the baseline);
# - churn: about RATE new tunnels a second, each living 1.5 s (stored at 1 s, removed at its
#   end: 2 messages to PID 1 each), for 10 s;
# - held: IDLE idle keep-alive connections stored, then nothing for 10 s;
# - churn again with those held (systemd checks each new fd against every stored one).
[ "${STASH_COST:-0}" = 1 ] || return 0
RATE=${STASH_COST_RATE:-1000}
HELD=${STASH_COST_HELD:-7000}
X systemctl log-level info   # debug logs a line per stored fd: not what a real PID 1 does
# Held connections must outlive the measurement: header_read closes an idle one after 10 s.
X sh -c 'cp /etc/baton/baton.toml /etc/baton/baton.toml.cost &&
         sed -i "s/^\[timeouts\]$/[timeouts]\nheader_read = \"300s\"/" /etc/baton/baton.toml'
timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT" || fail "stash cost: the reload with header_read = 300s failed"
SD=$("$SDH" pid "$S")
ticks() { awk '{ print $14 + $15 }' "/proc/$SD/stat"; }
HZ=$(getconf CLK_TCK)
cat > "$W/cost_client.py" <<'EOF'
# churn RATE SECONDS | hold N: through the proxy on 127.0.0.1:8080.
import asyncio, sys, time
async def tunnel(done):
    try:
        r, w = await asyncio.open_connection("127.0.0.1", 8080)
        w.write(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        await r.readuntil(b"\r\n\r\n")
        w.write(b"x"); await r.readexactly(1)
        await asyncio.sleep(1.5)
        w.close()
        done[0] += 1
    except Exception:
        done[1] += 1
async def churn(rate, seconds):
    done, tasks, t0 = [0, 0], [], time.time()
    for i in range(int(rate * seconds)):
        delay = t0 + i / rate - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(tunnel(done)))
    took = time.time() - t0
    await asyncio.gather(*tasks)
    print(f"opened {len(tasks)} tunnels in {took:.1f} s ({len(tasks)/took:.0f}/s): {done[0]} ok, {done[1]} failed", flush=True)
async def hold(n):
    conns = []
    for i in range(n):
        # From 64 source addresses: the configuration allows 256 connections a client.
        r, w = await asyncio.open_connection("127.0.0.1", 8080, local_addr=(f"127.0.0.{2 + i % 64}", 0))
        w.write(b"GET http://127.0.0.1:9000/ HTTP/1.1\r\nHost: 127.0.0.1:9000\r\n\r\n")
        await r.readuntil(b"ok")
        conns.append(w)
    print(f"holding {len(conns)} idle connections", flush=True)
    while True:
        await asyncio.sleep(3600)
if sys.argv[1] == "churn":
    asyncio.run(churn(float(sys.argv[2]), float(sys.argv[3])))
else:
    asyncio.run(hold(int(sys.argv[2])))
EOF
measure() {   # measure LABEL SECONDS CMD...: PID 1's CPU over the command (or SECONDS idle)
  local label=$1 secs=$2 t0 t1 w0 w1; shift 2
  t0=$(ticks); w0=$(date +%s%N)
  if [ $# -gt 0 ]; then "$@" | sed 's/^/      /'; else sleep "$secs"; fi
  t1=$(ticks); w1=$(date +%s%N)
  echo "      PID 1 CPU, $label: $(( (t1 - t0) * 1000 / HZ )) ms over $(( (w1 - w0) / 1000000 )) ms, store $(show NFileDescriptorStore) fds"
}
measure "idle" 5
measure "churn at $RATE tunnels/s" 0 N bash -c "ulimit -n 20000; exec $PY $W/cost_client.py churn $RATE 10"
N bash -c "ulimit -n 20000; exec $PY $W/cost_client.py hold $HELD" > "$W/cost.hold" 2>&1 &
HOLDER=$!
wait_for 120 grep -q holding "$W/cost.hold" || fail "stash cost: the idle connections did not open"
wait_for 30 eval '[ "$(show NFileDescriptorStore)" -ge '"$HELD"' ]' || echo "      (the store holds $(show NFileDescriptorStore) fds)"
measure "$HELD idle connections held" 10
measure "churn at $RATE tunnels/s with $HELD held" 0 N bash -c "ulimit -n 20000; exec $PY $W/cost_client.py churn $RATE 10"
kill "$HOLDER"
X mv /etc/baton/baton.toml.cost /etc/baton/baton.toml
timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT" || fail "stash cost: the reload back failed"
X systemctl log-level debug
check "stash cost: the unit served throughout" eval 'state_is active/running && get_ok'
