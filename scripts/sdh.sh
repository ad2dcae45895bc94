#!/bin/bash
# (Vendored copy of the shared systemd test harness; used by scripts/systemd-test.)
# sdh.sh - run a REAL systemd system manager (PID 1 of fresh pid/mount/uts/ipc/net/cgroup
# namespaces, over a throw-away overlay of the host's /) for integration tests.
# Needs: root, util-linux (unshare, nsenter, pivot_root), overlayfs, cgroup2 mounted somewhere.
#
#   sdh.sh up   STATE [UNITDIR] [BINDDIR...]  start; UNITDIR/* is copied to /run/systemd/system;
#                                             BINDDIRs (host paths) are bind-mounted at the same path
#   sdh.sh exec STATE CMD...                  run CMD inside (all namespaces: systemctl, journalctl, curl...)
#   sdh.sh net  STATE CMD...                  run CMD in the container's network ns only (host fs/pids)
#   sdh.sh pid  STATE                         print host PID of the container's systemd
#   sdh.sh down STATE                         stop everything, remove cgroup + state dir
set -eu
cmd=${1:?usage}; S=${2:?state dir}; shift 2

cg2_root() {   # where the (pure or hybrid) cgroup2 hierarchy is mounted on the host
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then echo /sys/fs/cgroup
  elif [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ]; then echo /sys/fs/cgroup/unified
  else echo "sdh: no cgroup2 hierarchy found" >&2; return 1; fi
}

case $cmd in
up)
  [ "$(id -u)" = 0 ] || { echo "sdh: must be root" >&2; exit 1; }
  UNITS=${1:-}; [ $# -gt 0 ] && shift
  mkdir -p "$S"; S=$(cd "$S" && pwd)
  CGR=$(cg2_root)
  PARENT=$CGR$(sed -n 's/^0:://p' /proc/self/cgroup)   # our own cgroup v2 path
  CG=${PARENT%/}/sdh.$$.$RANDOM
  mkdir "$CG"; echo "$CG" > "$S/cgroup"; echo "$PARENT" > "$S/cgroup.parent"
  cat > "$S/init.sh" <<'EOF'
set -eu
W=$SDH_STATE R=$SDH_STATE/root
mkdir -p "$W/ovl" "$R"
mount -t tmpfs -o mode=755 sdh-ovl "$W/ovl"
mkdir -p "$W/ovl/upper" "$W/ovl/work"
mount -t overlay sdh-root -o "lowerdir=/,upperdir=$W/ovl/upper,workdir=$W/ovl/work" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"           # sees only our cgroup (cgroup ns)
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for n in null zero full random urandom tty; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777 tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
for d in $SDH_BIND; do mkdir -p "$R$d"; mount --bind "$d" "$R$d"; done
mkdir -p "$R/run/systemd/system"
[ -n "$SDH_UNITS" ] && cp -a "$SDH_UNITS"/. "$R/run/systemd/system/"
cat > "$R/run/systemd/system/sdh.target" <<'UNIT'
[Unit]
Description=sdh boot target (journald only)
DefaultDependencies=no
Wants=systemd-journald.socket systemd-journald.service
UNIT
cd "$R"; mkdir -p .oldroot; pivot_root . .oldroot; umount -l /.oldroot; rmdir /.oldroot; cd /
exec env -i container=sdh PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /lib/systemd/systemd --system --unit=sdh.target --log-target=journal --log-level="$SDH_LOGLEVEL" --show-status=no
EOF
  (
    echo $BASHPID > "$CG/cgroup.procs"      # the cgroup namespace is rooted here
    SDH_STATE=$S SDH_UNITS=$UNITS SDH_BIND="$*" SDH_LOGLEVEL=${SDH_LOGLEVEL:-debug} \
      exec unshare --pid --fork --mount --uts --ipc --net --cgroup --propagation private /bin/sh "$S/init.sh"
  ) > "$S/console.log" 2>&1 < /dev/null &
  UP=$!; echo $UP > "$S/unshare.pid"
  for i in $(seq 500); do
    SD=$(cat /proc/$UP/task/$UP/children 2>/dev/null | awk '{print $1}')
    [ -n "$SD" ] && break; kill -0 $UP 2>/dev/null || break; sleep 0.01
  done
  [ -n "${SD:-}" ] || { echo "sdh: namespace init failed:" >&2; cat "$S/console.log" >&2; exit 1; }
  echo $SD > "$S/systemd.pid"
  echo $UP > "$PARENT/cgroup.procs"         # keep the ns root cgroup free of foreign processes
  for i in $(seq 1000); do                  # wait for the manager (up to ~10 s)
    st=$(nsenter -t $SD -m -p systemctl is-system-running 2>/dev/null) || true
    case $st in running|degraded) break;; esac
    kill -0 $SD 2>/dev/null || { echo "sdh: systemd died:" >&2; cat "$S/console.log" >&2; exit 1; }
    sleep 0.01
  done
  case $st in running|degraded) ;; *) echo "sdh: manager state '$st'" >&2; exit 1;; esac
  echo $SD
  ;;
exec) exec nsenter -t "$(cat "$S/systemd.pid")" -a "$@" ;;
net)  exec nsenter -t "$(cat "$S/systemd.pid")" -n "$@" ;;
pid)  cat "$S/systemd.pid" ;;
down)
  SD=$(cat "$S/systemd.pid" 2>/dev/null || true); UP=$(cat "$S/unshare.pid" 2>/dev/null || true)
  if [ -n "$SD" ] && kill -0 "$SD" 2>/dev/null; then
    # SIGKILL to a pid namespace's init kills every process in that namespace; the mount
    # namespace (overlay, tmpfs) disappears with its last process. (Graceful alternative:
    # `sdh.sh exec S systemctl poweroff` ~1.4 s.)
    kill -KILL "$SD"
  fi
  [ -n "$UP" ] && for i in $(seq 500); do kill -0 "$UP" 2>/dev/null || break; sleep 0.01; done
  CG=$(cat "$S/cgroup" 2>/dev/null || true)
  if [ -n "$CG" ] && [ -d "$CG" ]; then
    for i in $(seq 200); do find "$CG" -depth -type d -exec rmdir {} + 2>/dev/null && break; sleep 0.01; done
  fi
  [ -d "${CG:-/nonexistent}" ] && echo "sdh: could not remove $CG" >&2
  rm -rf "$S"
  ;;
*) echo "usage: $0 up|exec|net|pid|down STATE ..." >&2; exit 2 ;;
esac
