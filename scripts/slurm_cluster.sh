#!/usr/bin/env bash
# A single-node SLURM cluster on localhost, for tests and trying the SLURM launcher.
#
#   scripts/slurm_cluster.sh start    # install (Debian/Ubuntu, root) if missing, start, wait until idle
#   scripts/slurm_cluster.sh status   # exit 0 if the cluster answers and its node is usable
#   scripts/slurm_cluster.sh stop     # stop slurmctld/slurmd (and munged if this script started it)
#
# Idempotent: `start` on a running cluster does nothing. Everything lives in $SA_BENCH_SLURM_DIR
# (default /tmp/sa_bench-slurm), including slurm.conf: clients need
#   export SLURM_CONF=$SA_BENCH_SLURM_DIR/slurm.conf
# The node advertises $SA_BENCH_SLURM_GPUS fake GPUs (default 2; plain files, no CUDA), so
# `--gpus-per-node` requests are scheduled and SLURM sets CUDA_VISIBLE_DEVICES for each job.
# On failure it prints why (the last lines of the daemons' logs) and exits non-zero.
set -uo pipefail

DIR=${SA_BENCH_SLURM_DIR:-/tmp/sa_bench-slurm}
GPUS=${SA_BENCH_SLURM_GPUS:-2}
WAIT=${SA_BENCH_SLURM_WAIT:-180}
export SLURM_CONF=$DIR/slurm.conf
NODE=$(hostname -s)
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
PACKAGES=(munge slurmctld slurmd slurm-client)

say() { echo "slurm_cluster: $*"; }
fail() {
  say "FAILED: $*"
  for log in "$DIR"/log/*.log; do
    [ -f "$log" ] && { echo "--- $log (last 15 lines)"; tail -n 15 "$log"; }
  done
  exit 1
}

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || fail "missing ${missing[*]}; installing needs root (apt-get install ${PACKAGES[*]})"
  command -v apt-get >/dev/null || fail "missing ${missing[*]} and no apt-get on this machine"
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"$DIR/log/apt.log" 2>&1 || fail "apt-get update failed (see $DIR/log/apt.log)"
  apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$DIR/log/apt.log" 2>&1 \
    || fail "apt-get install ${PACKAGES[*]} failed (see $DIR/log/apt.log)"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; } \
    || fail "cannot create /etc/munge/munge.key"
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge/munge.key 2>/dev/null
  if id munge >/dev/null 2>&1 && command -v runuser >/dev/null; then
    runuser -u munge -- munged || fail "munged did not start"
  else
    munged --force || fail "munged did not start"
  fi
  touch "$DIR/munged.started"
  for _ in $(seq 20); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  fail "munge does not answer (munge -n | unmunge)"
}

write_config() {
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/gpu"
  local gres_line="" node_gres=""
  if [ "$GPUS" -gt 0 ]; then
    # slurmd wants character devices: make harmless ones (the same device as /dev/null)
    for i in $(seq 0 $((GPUS - 1))); do
      [ -c "$DIR/gpu/fake$i" ] || { rm -f "$DIR/gpu/fake$i"; mknod "$DIR/gpu/fake$i" c 1 3; } || fail "mknod $DIR/gpu/fake$i failed"
    done
    gres_line="GresTypes=gpu"
    node_gres="Gres=gpu:$GPUS"
    echo "NodeName=$NODE Name=gpu File=$DIR/gpu/fake[0-$((GPUS - 1))]" >"$DIR/gres.conf"
  else
    : >"$DIR/gres.conf"
  fi
  cat >"$SLURM_CONF" <<EOF
# written by scripts/slurm_cluster.sh: a single-node test cluster on localhost
ClusterName=sabench
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${SA_BENCH_SLURMCTLD_PORT:-6817}
SlurmdPort=${SA_BENCH_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=600
MailProg=/bin/true
$gres_line
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=1000 State=UNKNOWN $node_gres
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -o %T 2>/dev/null | head -n 1; }

is_up() {
  [ -f "$SLURM_CONF" ] || return 1
  scontrol ping 2>/dev/null | grep -q UP || return 1
  case "$(node_state)" in idle* | mixed* | allocated* | completing*) return 0 ;; esac
  return 1
}

start() {
  mkdir -p "$DIR/log"
  if is_up; then
    say "already running (export SLURM_CONF=$SLURM_CONF)"
    return 0
  fi
  install_packages
  start_munge
  stop_daemons quiet
  write_config
  : >"$DIR/log/slurmctld.log"
  : >"$DIR/log/slurmd.log"
  slurmctld -c -f "$SLURM_CONF" || fail "slurmctld did not start"
  slurmd -f "$SLURM_CONF" || fail "slurmd did not start"
  say "waiting up to ${WAIT}s for node $NODE"
  local t0=$SECONDS
  while ((SECONDS - t0 < WAIT)); do
    if is_up; then
      say "up after $((SECONDS - t0))s: node $NODE, $CPUS CPUs, $GPUS fake GPUs (export SLURM_CONF=$SLURM_CONF)"
      return 0
    fi
    for name in slurmctld slurmd; do
      pgrep -x "$name" >/dev/null || fail "$name exited"
    done
    case "$(node_state)" in down* | drain* | fail*)
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 ;;
    esac
    sleep 2
  done
  fail "node $NODE not usable after ${WAIT}s (state: $(node_state || true))"
}

stop_daemons() {
  [ -f "$SLURM_CONF" ] && scontrol shutdown >/dev/null 2>&1
  for name in slurmd slurmctld; do
    local pidfile=$DIR/$name.pid
    [ -f "$pidfile" ] || continue
    local pid
    pid=$(cat "$pidfile")
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill "$pid" 2>/dev/null
    rm -f "$pidfile"
  done
  [ "${1:-}" = quiet ] || say "stopped"
}

stop() {
  stop_daemons quiet
  if [ -f "$DIR/munged.started" ] && [ -f /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null
    rm -f "$DIR/munged.started"
  fi
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if is_up; then say "up (export SLURM_CONF=$SLURM_CONF)"; else say "down"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
