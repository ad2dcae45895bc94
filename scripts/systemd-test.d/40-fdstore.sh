# shellcheck shell=bash
# Sourced by scripts/systemd-test. systemd's fd store: a listener baton binds itself survives
# `kill -9` of the serving generation. The restarted service (Restart=on-failure) adopts it
# from the fd store, and a client that connected during the restart is served.
SIDE=http://127.0.0.1:8081
side_inode() {   # inode of the socket listening on 127.0.0.1:8081 (0100007F:1F91), if any
  N cat /proc/net/tcp | awk '$2 == "0100007F:1F91" && $4 == "0A" { print $10; exit }'
}
X sh -c 'cp /etc/baton/baton.toml /etc/baton/baton.toml.orig &&
         printf "\n[[listener]]\nname = \"side\"\naddress = \"127.0.0.1:8081\"\n" >> /etc/baton/baton.toml'
if timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT"; then rc=0; else rc=$?; fi
check "fd store: a second listener, bound by baton, reloaded in (rc=$rc) and serving" \
  eval '[ $rc = 0 ] && [ "$(N curl -sS --max-time 10 -x "$SIDE" "$ORIGIN/")" = ok ]'
check "fd store: the serving generation put 'side' and 'control' into systemd's fd store" \
  eval 'wait_for 5 eval "X journalctl -u \"$UNIT\" --no-pager -o verbose | grep -qi \"kept=side,control\""'
INODE=$(side_inode)
SERVING=$(show MainPID)
wait_for 40 eval '[ "$(cgroup_procs | wc -l)" = 1 ]' || fail "fd store: older generations did not drain"
RESTARTS=$(show NRestarts)
X kill -9 "$SERVING"
# A client during the restart: it connects into the accept queue systemd keeps.
C0=$(date +%s%N)
N curl -sS --max-time 20 -x "$SIDE" -w ' %{http_code}' "$ORIGIN/" > "$W/fdstore.client" 2>&1 &
CLIENT=$!
wait_for 20 eval '[ "$(show NRestarts)" -gt "$RESTARTS" ] && state_is active/running' ||
  fail "fd store: the unit was not restarted"
wait "$CLIENT"
CLIENT_MS=$(( ($(date +%s%N) - C0) / 1000000 ))
NEW=$(show MainPID)
check "fd store: kill -9 of $SERVING, restarted by systemd as $NEW (NRestarts $RESTARTS -> $(show NRestarts))" \
  eval '[ "$NEW" != "$SERVING" ] && [ "$NEW" -gt 0 ] && state_is active/running'
check "fd store: the client that connected during the restart was served: $(cat "$W/fdstore.client") after ${CLIENT_MS} ms" \
  eval '[ "$(cat "$W/fdstore.client")" = "ok 200" ]'
check "fd store: the same listening socket (inode $INODE -> $(side_inode)), adopted: $(X /usr/local/bin/baton status --config /etc/baton/baton.toml | grep side)" \
  eval '[ -n "$INODE" ] && [ "$(side_inode)" = "$INODE" ] &&
        X /usr/local/bin/baton status --config /etc/baton/baton.toml | grep "listener *side 127.0.0.1:8081 (inherited)" >/dev/null'
FDNAMES=$(X cat "/proc/$NEW/environ" | tr '\0' '\n' | sed -n 's/^LISTEN_FDNAMES=//p')
check "fd store: systemd passed LISTEN_FDNAMES=$FDNAMES; the control socket (RuntimeDirectoryPreserve=restart) came back too" \
  eval 'case ":$FDNAMES:" in *:bound.side:*) true ;; *) false ;; esac &&
        X /usr/local/bin/baton status --config /etc/baton/baton.toml | grep "listener *control unix:/run/baton/control.sock (inherited)" >/dev/null'
# Drop the listener again: it leaves the fd store, so nothing listens on 8081 any more.
X mv /etc/baton/baton.toml.orig /etc/baton/baton.toml
if timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT"; then rc=0; else rc=$?; fi
check "fd store: the listener dropped by the configuration (reload rc=$rc) is removed from the store: 8081 closed" \
  eval '[ $rc = 0 ] && wait_for 40 eval "[ -z \"\$(side_inode)\" ]" && get_ok'
