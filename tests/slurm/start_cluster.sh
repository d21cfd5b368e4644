#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests marked `slow` in
# tests/test_slurm.py (and for trying `--launcher=slurm` by hand):
#
#   tests/slurm/start_cluster.sh DIR     # start munged, slurmctld and slurmd, all state in DIR
#   export SLURM_CONF=DIR/slurm.conf     # then sbatch, squeue, scancel talk to this cluster
#   tests/slurm/start_cluster.sh --stop DIR
#
# Needs Debian's (or Ubuntu's) packages, as root:
#   apt-get update && apt-get install -y slurmctld slurmd slurm-client munge
# Start: a fresh munge key, munged on its own socket, a minimal slurm.conf (one node with this
# machine's cores and memory, partition `debug`, proctrack/linuxproc, task/none, no accounting,
# free ports), slurmctld and slurmd in the foreground in the background; their process ids go
# to DIR/pids, and the script waits until the node accepts jobs. Stop: cancels the cluster's
# jobs, then ends exactly the processes in DIR/pids (TERM, then KILL after 10 s). Nothing
# outside DIR is written, and no other process is touched.
set -euo pipefail

stop() {
  local dir=$1
  [[ -f "$dir/pids" ]] || { echo "no $dir/pids: nothing to stop" >&2; return 0; }
  SLURM_CONF="$dir/slurm.conf" scancel --quiet --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 20); do  # let the jobs end before their slurmd goes
    [[ -z "$(SLURM_CONF="$dir/slurm.conf" squeue --noheader --states=RUNNING,COMPLETING \
            2>/dev/null)" ]] && break
    sleep 0.5
  done
  local pids
  pids=$(tac "$dir/pids")  # slurmd, slurmctld, then munged
  for pid in $pids; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 20); do
    local alive=0
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.5
  done
  for pid in $pids; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$dir/pids"
  echo "stopped the SLURM cluster in $dir"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

start() {
  local dir
  dir=$(mkdir -p "$1" && cd "$1" && pwd)
  for binary in munged slurmctld slurmd sbatch; do
    command -v "$binary" >/dev/null || PATH="$PATH:/usr/sbin:/sbin"
    command -v "$binary" >/dev/null || {
      echo "no $binary: apt-get update && apt-get install -y slurmctld slurmd slurm-client munge" >&2
      exit 1
    }
  done
  [[ -f "$dir/pids" ]] && { echo "$dir/pids exists: a cluster runs there; stop it first" >&2; exit 1; }
  mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
  chmod 700 "$dir/munge"
  : > "$dir/pids"

  # munge: a fresh key, its own socket (the system's munged, if any, is left alone).
  dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$dir/munge/munge.key"
  munged --foreground --force --key-file="$dir/munge/munge.key" \
    --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
    --seed-file="$dir/munge/munged.seed" --log-file="$dir/munge/munged.log" \
    > "$dir/munge/munged.out" 2>&1 &
  echo $! >> "$dir/pids"
  for _ in $(seq 50); do [[ -S "$dir/munge/munge.socket" ]] && break; sleep 0.1; done

  local host cpus memory_mb
  host=$(hostname -s)
  cpus=$(nproc)
  memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  cat > "$dir/slurm.conf" <<CONF
ClusterName=moejaxtest
SlurmctldHost=$host
SlurmUser=$(id -un)
SlurmdUser=root
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF="$dir/slurm.conf"
  slurmctld -D -c -f "$SLURM_CONF" > "$dir/slurmctld.out" 2>&1 &
  echo $! >> "$dir/pids"
  slurmd -D -f "$SLURM_CONF" > "$dir/slurmd.out" 2>&1 &
  echo $! >> "$dir/pids"
  for _ in $(seq 60); do
    if sinfo --noheader --format=%T 2>/dev/null | grep -qx idle; then
      echo "SLURM cluster up: export SLURM_CONF=$SLURM_CONF (pids $(tr '\n' ' ' < "$dir/pids"))"
      return 0
    fi
    sleep 0.5
  done
  echo "the SLURM cluster in $dir did not come up; logs:" >&2
  tail -n 20 "$dir"/*.log "$dir"/*.out "$dir/munge/munged.log" >&2 || true
  stop "$dir"
  exit 1
}

if [[ "${1:-}" == "--stop" ]]; then
  stop "${2:?usage: $0 --stop DIR}"
else
  start "${1:?usage: $0 DIR}"
fi
