#!/usr/bin/env bash
# The whole test suite, as README.md gives it: style, unit/claim/model/crash
# tests, then the VM tier against Debian's real kernel with ublk_drv.
# Opt out of the VM tier only explicitly: SPLITMIRROR_SKIP_VM=reason.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== packages (tests/vm/deps.sh installs only what is missing)"
bash tests/vm/deps.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== shellcheck (VM tier, deploy)"
shellcheck -x tests/vm/run.sh tests/vm/deps.sh tests/vm/fetch-kernel.sh tests/deploy.sh tests/run-all.sh deploy/install.sh packaging/build-deb.sh benches/vm-perf.sh benches/vm-restore-load.sh demo/run.sh .ci/run
shellcheck -s sh -e SC1090,SC1091 tests/vm/lib.sh tests/vm/scenarios/*.sh benches/vm/*.sh demo/walk.sh
echo "== deploy/ (systemd-analyze verify, install.sh into a temp root)"
bash tests/deploy.sh
echo "== cargo test (release: the model and crash seeds run faster)"
cargo test --release
echo "== crash soak: real processes killed with SIGKILL mid-operation"
cargo run --release --example crash_soak -- --trials "${SPLITMIRROR_SOAK_TRIALS:-40}"
if [ -n "${SPLITMIRROR_SKIP_VM:-}" ]; then
  echo "== VM tier SKIPPED on request: $SPLITMIRROR_SKIP_VM"
  echo "   (unset SPLITMIRROR_SKIP_VM to run it; CI always runs it)"
  exit 0
fi
echo "== VM tier (qemu TCG, Debian 6.12 kernel, real ublk_drv)"
bash tests/vm/run.sh
# The scenarios that lean on the driver's newer behaviour (features, zero copy, user
# recovery and quiesce, restore through the queues) once more on Debian's
# newest 7.x kernel (trixie-backports), whose ublk_drv has grown since 6.12.
if [ -n "${SPLITMIRROR_SKIP_VM_KERNEL7:-}" ]; then
  echo "== VM tier on Debian's 7.x kernel SKIPPED on request: $SPLITMIRROR_SKIP_VM_KERNEL7"
else
  echo "== VM tier, kernel scenarios on Debian's newest 7.x kernel"
  debs=$(bash tests/vm/fetch-kernel.sh)
  SPLITMIRROR_VM_KERNEL_DEBS=$debs SPLITMIRROR_VM_LOGS=target/vm-logs/kernel7 bash tests/vm/run.sh \
    tests/vm/scenarios/01-kernel.sh tests/vm/scenarios/12-two-queues.sh tests/vm/scenarios/20-restore-full.sh \
    tests/vm/scenarios/40-fio-during-restore.sh tests/vm/scenarios/70-kill9-recovery.sh \
    tests/vm/scenarios/75-planned-restart.sh
fi
echo "== README's walk (demo/run.sh: in the VM when the host has no ublk_drv)"
bash demo/run.sh
