# kernel-target-export: export a 64 MiB RAM-backed namespace through the guest
# kernel's nvmet-tcp target on 0.0.0.0:4420 and 0.0.0.0:8009 (the usual
# discovery port), for a program on the host reached through hostfwd, e.g.
#   run-guest.sh --hostfwd tcp:127.0.0.1:14420-:4420 \
#       --host-cmd 'python3 qemu-scripts/tests/icreq-check.py 127.0.0.1 14420' \
#       scenarios/kernel-target-export.sh
# Env (--env): EXPORT_NQN (default nqn.2024-01.io.unvme:export),
#              EXPORT_SIZE_MB (64), HOST_TIMEOUT (240).
set -eu
# shellcheck source=SCRIPTDIR/../guest/lib.sh
. /share/lib.sh

NQN=${EXPORT_NQN:-nqn.2024-01.io.unvme:export}

backing=$(nvmet_ram_backing export "${EXPORT_SIZE_MB:-64}")
nvmet_subsys "$NQN" "$backing"
nvmet_port 1 0.0.0.0 4420 "$NQN"
# Linux 6.1 enables a port only once a subsystem is linked to it (there is no
# discovery-only port), so 8009 exports the subsystem too; every nvmet port
# also answers discovery.
nvmet_port 2 0.0.0.0 8009 "$NQN"
log "nvmet target: $NQN on 0.0.0.0:4420 and 0.0.0.0:8009 (discovery), namespace $backing"
awk 'NR > 1 && $4 == "0A" { print "listening: " $2 }' /proc/net/tcp

signal_ready
rc=0
wait_host_done "${HOST_TIMEOUT:-240}" || rc=$?
# What the target said (pr_warn and below do not reach the console).
dmesg | grep -E 'nvmet' | tail -n 40
nvmet_clear
exit "$rc"
