#!/usr/bin/env bash
# stop-local-slurm.sh - stop the daemons started by start-local-slurm.sh, by PID.
# Each PID is taken from $SLURM_STATE_DIR/<daemon>.pid (written by
# start-slurm.sh) or, if that is missing, from the daemon's own pid file;
# a PID is only signalled if /proc/PID/comm is the expected daemon name.
# Order: slurmd, slurmctld, slurmdbd, mariadbd, munged.  SIGTERM, wait up
# to 30 s, then SIGKILL.  Options:
#   --cancel-jobs   scancel all jobs first (so no slurmstepd is left behind)
#   --keep-munge    leave munged running
set -uo pipefail
STATE=${SLURM_STATE_DIR:-/tmp/local-slurm/state}
CANCEL=0; KEEP_MUNGE=0
for a in "$@"; do case "$a" in --cancel-jobs) CANCEL=1;; --keep-munge) KEEP_MUNGE=1;; esac; done
log() { echo "[stop-slurm $(date +%T)] $*"; }

if [ "$CANCEL" = 1 ] && command -v scancel >/dev/null; then
  ids=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${ids// /}" ]; then log "cancelling jobs: $ids"; scancel $ids 2>/dev/null; sleep 2; fi
fi

stop_one() { # NAME STATEFILE SYSPIDFILE
  local name=$1 f=$2 sys=$3 p="" src=""
  if [ -s "$f" ]; then p=$(cat "$f"); src=$f; fi
  if { [ -z "$p" ] || [ ! -d "/proc/$p" ]; } && [ -s "$sys" ]; then p=$(cat "$sys"); src=$sys; fi
  if [ -z "$p" ] || [ ! -d "/proc/$p" ] || [ "$(cat /proc/$p/comm 2>/dev/null)" != "$name" ]; then
    log "$name: not running"; rm -f "$f"; return 0
  fi
  log "$name: kill -TERM $p (pid from $src)"
  kill -TERM "$p" 2>/dev/null
  for i in $(seq 1 60); do [ -d "/proc/$p" ] || break; sleep 0.5; done
  if [ -d "/proc/$p" ]; then log "$name: still alive, kill -KILL $p"; kill -KILL "$p" 2>/dev/null; sleep 0.5; fi
  rm -f "$f"
}

stop_one slurmd    "$STATE/slurmd.pid"    /run/slurmd.pid
stop_one slurmctld "$STATE/slurmctld.pid" /run/slurmctld.pid
stop_one slurmdbd  "$STATE/slurmdbd.pid"  /run/slurmdbd.pid
stop_one mariadbd  "$STATE/mariadbd.pid"  /run/mysqld/mysqld.pid
[ "$KEEP_MUNGE" = 1 ] || stop_one munged "$STATE/munged.pid" /run/munge/munged.pid

left=$(ps -eo pid=,comm= | awk '$2 ~ /^(slurmstepd|slurmctld|slurmd|slurmdbd|mariadbd|munged)$/ {print $1"("$2")"}' | tr '\n' ' ')
[ -n "$left" ] && log "still running (not stopped by this script): $left"
log "done"
