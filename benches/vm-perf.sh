#!/usr/bin/env bash
# VM benchmark: splitmirror vs the raw virtio disk, both raw disks written
# at once, the kernel's dm-mirror and rublk's loop target, measured in ONE
# boot of the VM test tier (tests/vm/run.sh), interleaved and repeated, the
# targets in a shuffled order each round. Not part of the test suite: it
# takes ~40 min under TCG and TCG figures are noisy.
#
#   bash benches/vm-perf.sh
#
# Environment (besides tests/vm/run.sh's SPLITMIRROR_VM_* and SPLITMIRROR_BIN):
#   VM_PERF_ROUNDS   rounds (default 5)
#   VM_PERF_RUNTIME  seconds per fio job, after fio's 2 s ramp (default 5)
#   VM_PERF_JOBS     job names from benches/fio/ (default
#                    "randread-4k-qd32 randwrite-4k-qd32 seqread-128k")
#   VM_PERF_RATE     restore.rate_limit during the restoring phase (default:
#                    slow enough for the restore to last twice the phase)
#   VM_PERF_TARGETS  targets of a round, shuffled each round (default "raw
#                    raw2 dm-mirror rublk established split restoring
#                    restore-load"; raw2 = both raw disks written at once,
#                    its figure the lower per-disk IOPS; dm-mirror = the
#                    kernel's mirror over both disks; restore-load = a
#                    default unthrottled full restore with VM_PERF_LOAD_JOB
#                    started with it; rublk-async = rublk --async-await, the
#                    executor design splitmirror uses; rublk-zc = rublk
#                    --zero-copy, what zero copy buys where the kernel has it
#                    (after 6.12); established-copy, split-copy and
#                    restore-load-copy = splitmirror with ublk.zero_copy:
#                    off, against which established, split and restore-load
#                    show what zero copy buys it;
#                    raw and rublk required)
#   VM_PERF_LOAD_JOB the job of restore-load (default randwrite-4k-qd32)
#   RUBLK_BIN        prebuilt static rublk (default: built once with
#                    `cargo install rublk --no-default-features` into the
#                    VM cache, $SPLITMIRROR_VM_CACHE/rublk/bin/rublk)
#   VM_PERF_PROFILE  1: CPU profiles of the ublk servers (default 0: off).
#                    After the measured rounds, one more round runs the
#                    VM_PERF_PROFILE_JOBS on every target but raw under
#                    `perf record -a -e cpu-clock -g` in the guest (TCG has
#                    no PMU); its figures stay out of the summary. The
#                    guest's perf reports (CPU time by command; then of the
#                    server process only: kernel/user share, threads, hottest
#                    symbols, system calls per thread, kernel functions with
#                    their callees) go to $SPLITMIRROR_VM_LOGS/vm-perf-profile.txt
#                    as "PROF target=T job=J KIND: ..." lines
#   VM_PERF_PROFILE_JOBS  jobs to profile (default randwrite-4k-qd32)
#   VM_PERF_PROFILE_FREQ  samples per second (default 999)
#   PERF_BIN         the perf executable copied into the guest, an ELF (not
#                    a wrapper script) with its shared libraries (default
#                    /usr/bin/perf, Debian's linux-perf); missing = error
#
#   VM_PERF_PROFILE=1 VM_PERF_ROUNDS=1 VM_PERF_JOBS=randwrite-4k-qd32 bash benches/vm-perf.sh
#
# Output: the VM tier's PASS/FAIL line, a table of IOPS per target per round,
# then `name: value` lines (medians, ratios splitmirror ÷ rublk, goals).
# Exit status: non-zero if the run failed (not if a goal was missed).
set -euo pipefail
# One brace group: bash parses all of it before running any, so editing this
# file during a (long) run cannot break that run.
{
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$SCRIPT_DIR/.." && pwd)
CACHE=${SPLITMIRROR_VM_CACHE:-$HOME/.cache/splitmirror-vm}
LOGDIR=${SPLITMIRROR_VM_LOGS:-$REPO/target/vm-logs}
DISK_MIB=${SPLITMIRROR_VM_DISK_MIB:-256}
ROUNDS=${VM_PERF_ROUNDS:-5}
RUNTIME=${VM_PERF_RUNTIME:-5}
JOBS=${VM_PERF_JOBS:-randread-4k-qd32 randwrite-4k-qd32 seqread-128k}
TARGETS=${VM_PERF_TARGETS:-raw raw2 dm-mirror rublk established split restoring restore-load}
LOAD_JOB=${VM_PERF_LOAD_JOB:-randwrite-4k-qd32}
PROFILE=${VM_PERF_PROFILE:-0}
PROFILE_JOBS=${VM_PERF_PROFILE_JOBS:-randwrite-4k-qd32}
PROFILE_FREQ=${VM_PERF_PROFILE_FREQ:-999}
NAME=vm-perf

die() { echo "vm-perf: $*" >&2; exit 1; }
for v in ROUNDS RUNTIME DISK_MIB PROFILE_FREQ; do
  case ${!v} in ''|*[!0-9]*|0) die "$v=${!v} is not a positive number" ;; esac
done
read -r -a JOB_LIST <<<"$JOBS"
[ ${#JOB_LIST[@]} -gt 0 ] || die "VM_PERF_JOBS is empty"
for j in "${JOB_LIST[@]}"; do
  [ -f "$REPO/benches/fio/$j.fio" ] || die "no job file benches/fio/$j.fio"
done
NJOBS=${#JOB_LIST[@]}
read -r -a TARGET_LIST <<<"$TARGETS"
for t in "${TARGET_LIST[@]}"; do
  case $t in raw|raw2|dm-mirror|rublk|rublk-async|rublk-zc|established|split|established-copy|split-copy|restoring|restore-load|restore-load-copy) ;; *) die "unknown target $t in VM_PERF_TARGETS" ;; esac
done
for t in raw rublk; do
  case " $TARGETS " in *" $t "*) ;; *) die "VM_PERF_TARGETS must include $t" ;; esac
done
case $PROFILE in 0|1) ;; *) die "VM_PERF_PROFILE=$PROFILE is not 0 or 1" ;; esac
read -r -a PROFILE_JOB_LIST <<<"$PROFILE_JOBS"
NPROF=0
if [ "$PROFILE" = 1 ]; then
  [ ${#PROFILE_JOB_LIST[@]} -gt 0 ] || die "VM_PERF_PROFILE_JOBS is empty"
  for j in "${PROFILE_JOB_LIST[@]}"; do
    [ -f "$REPO/benches/fio/$j.fio" ] || die "no job file benches/fio/$j.fio (VM_PERF_PROFILE_JOBS)"
  done
  PERF=${PERF_BIN:-/usr/bin/perf}
  PERF=$(readlink -f "$PERF") || die "VM_PERF_PROFILE=1: perf ($PERF) not found (apt-get install linux-perf)"
  { [ -f "$PERF" ] && [ -x "$PERF" ]; } || die "VM_PERF_PROFILE=1: $PERF is not an executable file (apt-get install linux-perf)"
  # a wrapper script (older Debian's /usr/bin/perf) would not run in the guest
  [ "$(head -c 4 "$PERF" | tr -d '\177')" = ELF ] || die "VM_PERF_PROFILE=1: $PERF is not an ELF executable (a wrapper? set PERF_BIN)"
  "$PERF" --version >/dev/null 2>&1 || die "VM_PERF_PROFILE=1: $PERF --version fails here"
  # targets with a server process, times jobs
  NPROF=$(( (${#TARGET_LIST[@]} - 1) * ${#PROFILE_JOB_LIST[@]} ))
fi
# every job file the scenario needs
case " $TARGETS " in
  *" restore-load "*) case " $JOBS " in *" $LOAD_JOB "*) ;; *) die "VM_PERF_LOAD_JOB=$LOAD_JOB must be one of VM_PERF_JOBS (its ratio is to established on that job)" ;; esac ;;
esac
[ -f "$REPO/benches/fio/$LOAD_JOB.fio" ] || die "no job file benches/fio/$LOAD_JOB.fio (VM_PERF_LOAD_JOB)"
FIO_JOB_LIST=("${JOB_LIST[@]}" "$LOAD_JOB")
[ "$PROFILE" = 1 ] && FIO_JOB_LIST+=("${PROFILE_JOB_LIST[@]}")
# The restore must outlast the restoring phase (NJOBS jobs of ramp + runtime
# + ~5 s of fio start-up and status calls under TCG): aim for twice that.
RATE=${VM_PERF_RATE:-$(( DISK_MIB * 1024 / (2 * NJOBS * (RUNTIME + 7)) ))KiB}
# scenario limit: per job ~ runtime + ramp + 8 s, plus restarts and the
# unthrottled end of each restore
TMO=$(( ROUNDS * (${#TARGET_LIST[@]} * NJOBS * (RUNTIME + 10) + 400) + 300 ))
# the profiled round: perf's start-up, its overhead and ~5 reports per job
[ "$PROFILE" = 1 ] && TMO=$(( TMO + NPROF * (RUNTIME + 10 + 150) + 180 ))

# ---------------------------------------------------------------- rublk
if [ -n "${RUBLK_BIN:-}" ]; then
  RUBLK=$(readlink -f "$RUBLK_BIN") || die "RUBLK_BIN=$RUBLK_BIN not found"
else
  RUBLK=$CACHE/rublk/bin/rublk
  if [ ! -x "$RUBLK" ]; then
    echo "vm-perf: building rublk (static) into $CACHE/rublk (once)" >&2
    mkdir -p "$CACHE/rublk"
    RUSTFLAGS="-C target-feature=+crt-static" cargo install rublk --no-default-features \
      --target x86_64-unknown-linux-gnu --root "$CACHE/rublk" >"$CACHE/rublk/build.log" 2>&1 \
      || { tail -n 30 "$CACHE/rublk/build.log" >&2; die "cargo install rublk failed (needs libclang-dev; log $CACHE/rublk/build.log)"; }
  fi
fi
[ -x "$RUBLK" ] || die "$RUBLK is not executable"

# ---------------------------------------------------------------- scenario
# run.sh copies the scenario file into the VM: prepend the parameters and
# the fio job files (as here-documents written to $SCRATCH) to it.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/vm-perf.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SCEN=$WORK/$NAME.sh
{
  echo '#!/bin/sh'
  echo "# timeout: $TMO"
  echo "# generated by benches/vm-perf.sh from benches/vm/perf-scenario.sh"
  echo "PERF_ROUNDS=$ROUNDS PERF_RUNTIME=$RUNTIME PERF_RATE=$RATE"
  echo "PERF_JOBS='$JOBS' PERF_TARGETS='$TARGETS' PERF_LOAD_JOB='$LOAD_JOB'"
  echo "PERF_PROFILE=$PROFILE PERF_PROFILE_JOBS='$PROFILE_JOBS' PERF_PROFILE_FREQ=$PROFILE_FREQ"
  declare -A written=()
  for j in "${FIO_JOB_LIST[@]}"; do
    [ -n "${written[$j]:-}" ] && continue
    written[$j]=1
    echo "cat >\"\$SCRATCH/$j.fio\" <<'PERF_FIO_EOF'"
    cat "$REPO/benches/fio/$j.fio"
    echo "PERF_FIO_EOF"
  done
  cat "$SCRIPT_DIR/vm/perf-scenario.sh"
} >"$SCEN"

EXTRA=$RUBLK
if [ "$PROFILE" = 1 ]; then
  EXTRA="$EXTRA $PERF"
  echo "vm-perf: then a profiled round of ($PROFILE_JOBS) with $PERF at ${PROFILE_FREQ} Hz" >&2
fi
echo "vm-perf: $ROUNDS rounds x ($TARGETS) x ($JOBS), ${RUNTIME}s each, restore rate $RATE, limit ${TMO}s" >&2
PROFOUT=$LOGDIR/$NAME-profile.txt
[ "$PROFILE" = 1 ] && rm -f "$PROFOUT"
set +e
SPLITMIRROR_VM_EXTRA_BINS=$EXTRA SPLITMIRROR_VM_LOGS=$LOGDIR bash "$REPO/tests/vm/run.sh" "$SCEN"
rc=$?
set -e
LOG=$LOGDIR/$NAME.log
[ "$rc" -eq 0 ] || die "the VM run failed (rc=$rc); console log: $LOG"
grep -aq '^PERF-DONE' "$LOG" || die "no PERF-DONE in $LOG"
if [ "$PROFILE" = 1 ]; then
  grep -a -e '^PERF-INFO' -e '^PERF-PROF ' -e '^PROF ' "$LOG" >"$PROFOUT" || true
  for j in "${PROFILE_JOB_LIST[@]}"; do
    for t in "${TARGET_LIST[@]}"; do
      [ "$t" = raw ] && continue
      grep -aq "^PROF target=$t job=$j self: " "$PROFOUT" || die "no profile of $t during $j in $LOG"
    done
  done
fi

# ---------------------------------------------------------------- summary
echo
grep -a '^PERF-INFO' "$LOG" | sed 's/^PERF-INFO /info: /'
NCPU=$(grep -a -o '^PERF-INFO kernel=.* cpus=[0-9]*' "$LOG" | sed 's/.*cpus=//' | head -n 1)
grep -a '^PERF round=' "$LOG" | awk -v jobs="$JOBS" -v targets="$TARGETS" -v rounds="$ROUNDS" \
  -v runtime="$RUNTIME" -v ncpu="${NCPU:-2}" -v loadjob="$LOAD_JOB" '
function goal(name, j, t, ref, want) {
  if ((j, t, ref) in rat) printf "goal_%s: %s (%.3f)\n", name, (rat[j, t, ref] >= want ? "met" : "missed"), rat[j, t, ref]
}
function median(a, n,    i, j, t, b) {
  for (i = 1; i <= n; i++) b[i] = a[i]
  for (i = 2; i <= n; i++) { t = b[i]; for (j = i - 1; j >= 1 && b[j] > t; j--) b[j + 1] = b[j]; b[j + 1] = t }
  return (n % 2) ? b[(n + 1) / 2] : (b[n / 2] + b[n / 2 + 1]) / 2
}
{
  for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  k = f["job"] SUBSEP f["target"] SUBSEP f["round"]
  v[k] = f["iops"]
  if ("restore_s" in f) rs[f["target"], f["round"]] = f["restore_s"]
  # server CPU per I/O: ticks are 10 ms; fio counts I/Os after its 2 s ramp,
  # the ticks include it, so this slightly overstates the cost
  if (f["server_ticks"] > 0) cpu[k] = f["server_ticks"] * 10000 / (f["iops"] * (runtime + 2))
  if (f["ring_waits"] > 0) batch[k] = f["requests"] / f["ring_waits"]
  if (f["wall"] > 0) busy[k] = 100 * (1 - f["idle_ticks"] / (f["wall"] * 100 * ncpu))
  delete f
}
END {
  nj = split(jobs, J, " "); nt = split(targets, T, " ")
  printf "IOPS per round (within a round: %s)\n", targets
  printf "%-20s %-17s", "job", "target"
  for (r = 1; r <= rounds; r++) printf " %8s", "r" r
  printf " %8s %9s\n", "median", "MiB/s"
  for (a = 1; a <= nj; a++) {
    j = J[a]; bs = (j ~ /128k/) ? 128 : 4
    for (b = 1; b <= nt; b++) {
      t = T[b]; n = 0
      if (t ~ /^restore-load/ && j != loadjob) continue
      printf "%-20s %-17s", j, t
      for (r = 1; r <= rounds; r++) {
        if ((j, t, r) in v) { printf " %8d", v[j, t, r]; x[++n] = v[j, t, r] } else printf " %8s", "-"
      }
      if (n != rounds) missing = missing " " j "/" t
      m[j, t] = n ? median(x, n) : 0
      printf " %8d %9.1f\n", m[j, t], m[j, t] * bs / 1024
    }
  }
  printf "\nmedians over rounds: ublk server CPU time per I/O (approx.), guest CPU busy,\n"
  printf "req/wait: splitmirror host requests per wait of a queue thread in its ring\n"
  printf "%-20s %-17s %12s %9s %9s\n", "job", "target", "server_us/io", "busy_%", "req/wait"
  for (a = 1; a <= nj; a++) for (b = 1; b <= nt; b++) {
    j = J[a]; t = T[b]; n = 0; nb = 0; nw = 0
    if (t ~ /^restore-load/ && j != loadjob) continue
    for (r = 1; r <= rounds; r++) {
      if ((j, t, r) in cpu) x[++n] = cpu[j, t, r]
      if ((j, t, r) in busy) y[++nb] = busy[j, t, r]
      if ((j, t, r) in batch) z[++nw] = batch[j, t, r]
    }
    cu[j, t] = n ? median(x, n) : -1
    printf "%-20s %-17s %12s %9.0f %9s\n", j, t, n ? sprintf("%.1f", cu[j, t]) : "-", nb ? median(y, nb) : 0, nw ? sprintf("%.2f", median(z, nw)) : "-"
    if (nw) wb[j, t] = median(z, nw)
  }
  print ""
  for (a = 1; a <= nj; a++) for (b = 1; b <= nt; b++) if ((J[a], T[b]) in m) printf "%s.%s.median_iops: %d\n", J[a], T[b], m[J[a], T[b]]
  for (a = 1; a <= nj; a++) for (b = 2; b <= nt; b++) if (cu[J[a], T[b]] >= 0) printf "%s.%s.server_us_per_io: %.1f\n", J[a], T[b], cu[J[a], T[b]]
  for (a = 1; a <= nj; a++) for (b = 1; b <= nt; b++) if ((J[a], T[b]) in wb) printf "%s.%s.requests_per_ring_wait: %.2f\n", J[a], T[b], wb[J[a], T[b]]
  # every ratio, taken within each round (same boot, neighbouring
  # minutes), then the median and the spread (lowest..highest) over rounds;
  # against each reference target measured
  nr = split("rublk raw raw2 dm-mirror established established-copy split-copy restore-load-copy", R, " ")
  for (a = 1; a <= nj; a++) for (c = 1; c <= nr; c++) {
    j = J[a]; ref = R[c]
    if (!((j, ref) in m)) continue
    for (b = 1; b <= nt; b++) {
      t = T[b]; if (t == ref) continue
      n = 0; lo = 1e9; hi = 0
      for (r = 1; r <= rounds; r++) if ((j, t, r) in v && (j, ref, r) in v && v[j, ref, r] > 0) {
        x[++n] = v[j, t, r] / v[j, ref, r]
        if (x[n] < lo) lo = x[n]; if (x[n] > hi) hi = x[n]
      }
      if (!n) continue
      q = median(x, n); rat[j, t, ref] = q
      printf "%s.%s_vs_%s: %.3f (spread %.3f..%.3f, %d rounds)\n", j, t, ref, q, lo, hi, n
    }
  }
  for (b = 1; b <= nt; b++) {
    t = T[b]; n = 0; lo = 1e9; hi = 0
    for (r = 1; r <= rounds; r++) if ((t, r) in rs) { x[++n] = rs[t, r]; if (rs[t, r] < lo) lo = rs[t, r]; if (rs[t, r] > hi) hi = rs[t, r] }
    name = t; gsub(/-/, "_", name)
    if (n) printf "%s.restore_s: %.2f (spread %.2f..%.2f, %d rounds)\n", name, median(x, n), lo, hi, n
  }
  # the goals of issue 13 (medians of the per-round ratios)
  goal("established_vs_raw2_ge_0.9", "randwrite-4k-qd32", "established", "raw2", 0.9)
  goal("established_vs_dm_mirror_ge_1.2", "randwrite-4k-qd32", "established", "dm-mirror", 1.2)
  goal("split_vs_rublk_ge_0.95", "randwrite-4k-qd32", "split", "rublk", 0.95)
  for (b = 1; b <= nt; b++) if (T[b] == "established" || T[b] == "split" || T[b] == "restoring")
    goal("randread_" T[b] "_vs_rublk_ge_0.95", "randread-4k-qd32", T[b], "rublk", 0.95)
  goal("restore_load_vs_established_ge_0.9", loadjob, "restore-load", "established", 0.9)
  if (missing != "") { printf("vm-perf: missing measurements:%s\n", missing) > "/dev/stderr"; exit 1 }
}'
if grep -aq '^PERF round=.* target=restoring ' "$LOG"; then
  echo "restoring: state and progress of the running copy (tracks) at the end of each job:"
  grep -a '^PERF round=.* target=restoring ' "$LOG" \
    | sed -n 's/^PERF round=\([0-9]*\) .* job=\([^ ]*\) .*state_end=\([^ ]*\) restored=\([^ ]*\).*/  round \1 \2: \3 \4/p'
fi
if [ "$PROFILE" = 1 ]; then
  echo "profiles (kernel vs user space of each server; details in the file):"
  sed -n 's/^PROF \(.*\) share: /  \1: /p' "$PROFOUT"
  echo "profiles: $PROFOUT"
fi
echo "console log: $LOG"
exit 0
}
