# Sourced by scripts/systemd-test (its helpers and variables: X, N, check, show, wait_for,
# load_start/load_stop, get, get_ok, gone, $UNIT, $W, $PY, $ROOT, $ORIGIN...).
# --- journald: every generation logs natively (its own _PID, GENERATION=); access lines go to
# /var/log/baton/access.log (the shipped baton.toml, LogsDirectory=baton), or to the journal
# with STATUS= and TARGET=; logrotate (contrib/logrotate/baton) rotates the file with no signal
# and no handoff -----------------------------------------------------------------------------
ACCESS_LOG=/var/log/baton/access.log

# jfields FIELD... [-- MATCH...]: one line per journal entry of the unit that matches MATCH
# (journalctl matches) and came after $JSINCE (realtime, microseconds; see jmark), the FIELDs'
# values joined by '|'; a field the entry holds twice (TARGET on access lines) gives its values
# sorted, joined by ','. (Not --after-cursor: journalctl 252 skips the first matching entry
# when it is combined with matches.)
JSINCE=0
jfields() {
  local fields=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do fields+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  X journalctl -u "$UNIT" --no-pager -o json "$@" 2>/dev/null | "$PY" -c '
import json, signal, sys
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a reader that stops early (grep -q) is fine
since = int(sys.argv[1])
for line in sys.stdin:
    e = json.loads(line)
    if int(e["__REALTIME_TIMESTAMP"]) <= since:
        continue
    def value(name):
        v = e.get(name, "")
        return ",".join(sorted(map(str, v))) if isinstance(v, list) else str(v)
    print("|".join(value(n) for n in sys.argv[2:]))' "$JSINCE" "${fields[@]}"
}
# From now on jfields sees only later entries. (Generation numbers repeat: from 1 after each
# start, and a failed handoff's number is used again by the next attempt.)
jmark() { JSINCE=$(date +%s%6N); }
access_count() { local n; n=$(X sh -c "grep -c -- '$1' $ACCESS_LOG 2>/dev/null"); echo "${n:-0}"; }
reload_rc() { if timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT"; then echo 0; else echo $?; fi; }

# 1. A reload under load: each generation's entries carry its own _PID and GENERATION.
OLD=$(show MainPID)
OLDGEN=$(jfields GENERATION -- _PID="$OLD" MESSAGE="baton serving" | tail -n 1)
jmark
BEFORE=$(access_count ' status=200 ')
load_start 2
sleep 0.3
rc=$(reload_rc)
NEW=$(show MainPID)
sleep 0.3
read -r OK BAD <<<"$(load_stop)"
wait_for 40 gone "$OLD" || fail "journald: generation $OLD did not drain"
NEWGEN=$(jfields GENERATION -- _PID="$NEW" MESSAGE="baton serving" | tail -n 1)
check "journald: reload under load, MainPID $OLD (generation $OLDGEN) -> $NEW (generation $NEWGEN): $OK responses, $BAD failed" \
  eval '[ "$rc" = 0 ] && [ "$NEW" != "$OLD" ] && [ -n "$OLDGEN" ] && [ "$NEWGEN" = $((OLDGEN + 1)) ] &&
        [ "$OK" -gt 0 ] && [ "$BAD" = 0 ]'
new_entries() { jfields _PID MESSAGE -- GENERATION="$NEWGEN"; }
check "journald: journalctl -u $UNIT GENERATION=$NEWGEN: the successor's entries, every one with _PID=$NEW" \
  wait_for 5 eval '[ "$(new_entries | cut -d"|" -f1 | sort -u)" = "$NEW" ] && [ "$(new_entries | wc -l)" -ge 2 ] &&
                   new_entries | grep -qx "$NEW|baton serving"'
new_entries | sed 's/^/      GENERATION='"$NEWGEN"': /'
old_last() { jfields MESSAGE _PID GENERATION -- GENERATION="$OLDGEN" | tail -n 1; }
check "journald: the old generation's last entry is its exit line, with its own _PID and GENERATION: $(old_last)" \
  wait_for 5 eval '[ "$(old_last)" = "drained; exiting|$OLD|$OLDGEN" ]'

# 2. Access lines: in the file, not in the journal (whose rate limit they would exceed).
AFTER=$(access_count ' status=200 ')
JACCESS=$(jfields _PID -- TARGET=baton::access | grep -c .)
JBATON=$(jfields _PID -- SYSLOG_IDENTIFIER=baton _TRANSPORT=journal | grep -c .)
check "journald: $((AFTER - BEFORE)) access lines with status=200 in $ACCESS_LOG for $OK responses; $JACCESS in the journal, which got $JBATON entries from baton" \
  eval '[ $((AFTER - BEFORE)) -ge "$OK" ] && [ "$JACCESS" = 0 ] && [ "$JBATON" -lt 20 ]'
check "journald: $ACCESS_LOG belongs to the service's dynamic user, mode 0600" \
  eval '[ "$(X stat -L -c %a "$ACCESS_LOG")" = 600 ] && [ "$(X stat -L -c %U "$ACCESS_LOG")" != root ]'

# 3. access = "stderr": access lines go to the journal, natively, with STATUS= and TARGET=.
X sh -c 'sed "s|^access = .*|access = \"stderr\"|" /etc/baton/baton.toml > /etc/baton/baton.toml.new &&
         mv /etc/baton/baton.toml.new /etc/baton/baton.toml'
jmark
rc=$(reload_rc)
PIDJ=$(show MainPID)
GENJ=$(jfields GENERATION -- _PID="$PIDJ" MESSAGE="baton serving" | tail -n 1)
[ "$(get /journald-probe 2>&1)" = ok ] || fail "journald: the probe request failed"
probe() { jfields STATUS TARGET METHOD _PID GENERATION MESSAGE -- TARGET="$ORIGIN/journald-probe"; }
check "journald: with access = \"stderr\", the access line is a journal entry: $(probe)" \
  wait_for 5 eval '[ "$rc" = 0 ] && [ -n "$GENJ" ] &&
    [ "$(probe)" = "200|baton::access,$ORIGIN/journald-probe|GET|$PIDJ|$GENJ|request" ]'
check "journald: journalctl -u $UNIT STATUS=200 TARGET=$ORIGIN/journald-probe finds it" \
  eval '[ "$(jfields _PID -- STATUS=200 TARGET="$ORIGIN/journald-probe")" = "$PIDJ" ]'
check "journald: ... and $ACCESS_LOG did not get it" eval '[ "$(access_count journald-probe)" = 0 ]'
X install -m 0644 "$W/baton.toml" /etc/baton/baton.toml
rc=$(reload_rc)
[ "$rc" = 0 ] || fail "journald: the reload back to the shipped baton.toml failed (rc=$rc)"

# 4. logrotate renames the file; every generation opens a new one within a second.
cp "$ROOT/contrib/logrotate/baton" "$W/logrotate.baton"
X install -D -m 0644 "$W/logrotate.baton" /etc/logrotate.d/baton
[ "$(get /before-rotation 2>&1)" = ok ] || fail "journald: the request before the rotation failed"
wait_for 5 eval '[ "$(access_count before-rotation)" = 1 ]' || fail "journald: no access line before the rotation"
jmark
PIDR=$(show MainPID)
if X logrotate -f -s /tmp/logrotate.status /etc/logrotate.d/baton >"$W/logrotate.out" 2>&1; then rc=0; else rc=$?; fi
check "journald: logrotate -f /etc/logrotate.d/baton exits 0 (rc=$rc$(sed 's/^/; /' "$W/logrotate.out" | tr -d '\n'))" \
  eval '[ "$rc" = 0 ] && X grep -q before-rotation "$ACCESS_LOG.1"'
check "journald: baton $PIDR created a new $ACCESS_LOG within a second or two, and logged it" \
  wait_for 5 eval 'X test -e "$ACCESS_LOG" &&
    jfields _PID -- MESSAGE="access log reopened: the path named another file or none" | grep -qx "$PIDR"'
[ "$(get /after-rotation 2>&1)" = ok ] || fail "journald: the request after the rotation failed"
check "journald: the next access line is in the new file, not the rotated one" \
  wait_for 5 eval '[ "$(access_count after-rotation)" = 1 ] && ! X grep -q after-rotation "$ACCESS_LOG.1" &&
    ! X grep -q before-rotation "$ACCESS_LOG"'
check "journald: still serving, active/running" eval 'get_ok && state_is active/running'
