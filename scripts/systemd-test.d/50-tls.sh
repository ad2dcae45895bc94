# Sourced by scripts/systemd-test (its helpers: X, N, check, show, wait_for, state_is, get_ok).
# A TLS listener under the shipped sandbox with a certbot-style renewal: certbot's keys are
# root-only, the unit runs as a DynamicUser; contrib/certbot/certbot-deploy-hook copies each
# renewal to /etc/baton/tls (root:baton-tls 0640) and reloads, and the drop-in
# contrib/certbot/baton-tls.conf gives the unit SupplementaryGroups=baton-tls. Checks: without
# the group the handoff fails naming the key and the old generation serves on; with it the
# certificate is served, a renewal by `systemctl reload` shows the new serial and a TLS
# session resumes across it, a broken renewal is rolled back. Leaves the unit serving (with
# the TLS listener and a good certificate).
TLSW=$W/tls
mkdir -p "$TLSW"
cp "$ROOT/contrib/certbot/certbot-deploy-hook" "$ROOT/contrib/certbot/baton-tls.conf" "$TLSW/"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=baton-test-ca \
  -keyout "$TLSW/ca.key" -out "$TLSW/ca.pem" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' > "$TLSW/san"
# tls_leaf SERIAL: a certificate for 127.0.0.1 in $TLSW/SERIAL.crt, its key in SERIAL.key.
tls_leaf() {
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
    -keyout "$TLSW/$1.key" -out "$TLSW/$1.csr" 2>/dev/null &&
  openssl x509 -req -in "$TLSW/$1.csr" -CA "$TLSW/ca.pem" -CAkey "$TLSW/ca.key" -set_serial "0x$1" \
    -days 2 -extfile "$TLSW/san" -out "$TLSW/$1.crt" 2>/dev/null
}
# certbot_renews CERT KEY: what certbot leaves in its live directory (root-only), then its
# deploy hook; returns the hook's status (that of `systemctl reload`).
LINEAGE=/etc/letsencrypt/live/proxy.test
certbot_renews() {
  X install -d -m 0700 /etc/letsencrypt /etc/letsencrypt/live "$LINEAGE"
  X install -m 0600 "$TLSW/$1.crt" "$LINEAGE/fullchain.pem"
  X install -m 0600 "$TLSW/$2.key" "$LINEAGE/privkey.pem"
  timeout 60 "$SDH" exec "$S" env RENEWED_LINEAGE="$LINEAGE" /usr/local/lib/baton/certbot-deploy-hook
}
served_serial() { N openssl s_client -connect 127.0.0.1:8443 -CAfile "$TLSW/ca.pem" </dev/null 2>/dev/null | openssl x509 -noout -serial 2>/dev/null; }
tls_get_ok() { [ "$(N curl -sS --max-time 10 --proxy https://127.0.0.1:8443 --proxy-cacert "$TLSW/ca.pem" "$ORIGIN/" 2>/dev/null)" = ok ]; }
for s in 51 52 53 54; do tls_leaf $s; done

X groupadd --system baton-tls
X install -D -m 0755 "$TLSW/certbot-deploy-hook" /usr/local/lib/baton/certbot-deploy-hook
certbot_renews 51 51
X sh -c 'printf "\n[[listener]]\nname = \"secure\"\naddress = \"127.0.0.1:8443\"\ntls = { cert = \"/etc/baton/tls/fullchain.pem\", key = \"/etc/baton/tls/privkey.pem\" }\n" >> /etc/baton/baton.toml'

OLD=$(show MainPID)
if timeout 60 "$SDH" exec "$S" systemctl reload "$UNIT" 2>/dev/null; then rc=0; else rc=$?; fi
check "TLS: without SupplementaryGroups the DynamicUser cannot read the key: reload fails (rc=$rc), MainPID stays $OLD, plain proxy serves" \
  eval '[ $rc != 0 ] && [ "$(show MainPID)" = "$OLD" ] && state_is active/running && get_ok'
check "TLS: the failed handoff names the unreadable file" \
  eval 'X journalctl -u "$UNIT" --no-pager -o cat | grep -q "handoff failed, serving on: .*cannot read /etc/baton/tls/"'

X install -D -m 0644 "$TLSW/baton-tls.conf" /run/systemd/system/baton.service.d/tls.conf
X systemctl daemon-reload
X systemctl restart "$UNIT"
check "TLS: with the drop-in (SupplementaryGroups=baton-tls) the unit serves HTTPS to the proxy: serial 51" \
  eval 'state_is active/running && wait_for 5 tls_get_ok && [ "$(served_serial)" = serial=51 ] && get_ok'

N openssl s_client -connect 127.0.0.1:8443 -CAfile "$TLSW/ca.pem" -tls1_2 -sess_out "$TLSW/session" </dev/null >/dev/null 2>&1
OLD=$(show MainPID)
if certbot_renews 52 52; then rc=0; else rc=$?; fi
check "TLS: certbot renewal (deploy hook: copy + systemctl reload) exits 0 and hands off (MainPID $OLD -> $(show MainPID)): serial 52" \
  eval '[ $rc = 0 ] && [ "$(show MainPID)" != "$OLD" ] && [ "$(served_serial)" = serial=52 ] && tls_get_ok'
RESUMED=$(N openssl s_client -connect 127.0.0.1:8443 -CAfile "$TLSW/ca.pem" -tls1_2 -sess_in "$TLSW/session" </dev/null 2>/dev/null | grep -E '^(Reused|New),')
check "TLS: a session from before the reload resumes after it ($RESUMED): the ticket keys went to the successor" \
  eval '[ "${RESUMED%%,*}" = Reused ] && ! X journalctl -u "$UNIT" --no-pager -o cat | grep -q "cannot pass the TLS ticket keys"'

OLD=$(show MainPID)
if certbot_renews 53 54 2>/dev/null; then rc=0; else rc=$?; fi
check "TLS: a renewal whose key does not match: the hook fails (rc=$rc), MainPID stays $OLD, serial 52 still served" \
  eval '[ $rc != 0 ] && [ "$(show MainPID)" = "$OLD" ] && [ "$(served_serial)" = serial=52 ] && tls_get_ok && get_ok'
X journalctl -u "$UNIT" --no-pager -o cat | grep 'handoff failed, serving on' | tail -n 1 | sed 's/^/      journal: /'
if certbot_renews 53 53; then rc=0; else rc=$?; fi
check "TLS: the next good renewal serves serial 53" eval '[ $rc = 0 ] && [ "$(served_serial)" = serial=53 ] && state_is active/running'
