# shellcheck shell=bash
# Sourced by scripts/systemd-test. Inside the unit's sandbox (SystemCallFilter=@system-service):
# the old generation holds its successor by a pidfd during the canary window, and
# `baton rollback` hands off by execveat to the previous binary, held open since.
OLD=$(show MainPID)
( if timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT"; then echo 0; else echo $?; fi > "$W/reload.rc" ) &
RELOAD=$!
check "pidfd: generation $OLD holds its successor by a pidfd during the handoff" \
  eval 'wait_for 10 eval "X ls -l /proc/$OLD/fd 2>/dev/null | grep -q \"anon_inode:\[pidfd\]\""'
wait "$RELOAD"
check "pidfd: the reload completes (rc=$(cat "$W/reload.rc")), MainPID $OLD -> $(show MainPID)" \
  eval '[ "$(cat "$W/reload.rc")" = 0 ] && [ "$(show MainPID)" != "$OLD" ] && wait_for 40 gone "$OLD"'
OLD=$(show MainPID)
load_start 2
if OUT=$(X /usr/local/bin/baton rollback --control /run/baton/control.sock 2>&1); then rc=0; else rc=$?; fi
read -r OK BAD <<<"$(load_stop)"
NEW=$(show MainPID)
check "baton rollback under the sandbox: rc=$rc, MainPID $OLD -> $NEW, active/running, $OK responses, $BAD failed" \
  eval '[ $rc = 0 ] && [ "$NEW" != "$OLD" ] && state_is active/running && [ "$BAD" = 0 ] && get_ok'
echo "$OUT" | sed 's/^/      rollback: /'
check "baton rollback: logged as a rollback, the pid file follows" \
  eval 'X journalctl -u "$UNIT" --no-pager -o cat | grep -q "rollback: starting new generation from the previous binary" &&
        [ "$(X cat /run/baton/baton.pid)" = "$NEW" ] && wait_for 40 gone "$OLD"'
