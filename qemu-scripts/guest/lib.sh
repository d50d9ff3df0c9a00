# lib.sh: helpers for guest scenarios.  Source it from a scenario:
#     . /share/lib.sh
# (busybox sh; POSIX shell only)

UNVME_SHARE=${UNVME_SHARE:-/share}

# log MSG...: progress line on the console (and in the host's guest log).
log() { echo "[scenario $(cut -d' ' -f1 /proc/uptime)] $*"; }

# fail MSG...: report and exit the scenario with status 1.
fail() { echo "[scenario] FAIL: $*" >&2; exit 1; }

# run CMD...: log a command, run it, fail if it fails.
run() { log "+ $*"; "$@" || fail "command failed (exit $?): $*"; }

# signal_ready: tell the host launcher the guest side is ready; it then runs
# its --host-cmd.
signal_ready() { : > "$UNVME_SHARE/ready.tmp" && mv "$UNVME_SHARE/ready.tmp" "$UNVME_SHARE/ready"; log "signalled ready"; }

# wait_host_done [TIMEOUT_S]: wait until the launcher's host command finished
# (default 240 s).  Returns the host command's exit status (124 on timeout
# here, 125 if there was no host command).
wait_host_done() {
    _t=${1:-240}
    _end=$(( $(cut -d. -f1 /proc/uptime) + _t ))
    while [ ! -f "$UNVME_SHARE/host-done" ]; do
        if [ "$(cut -d. -f1 /proc/uptime)" -ge "$_end" ]; then
            log "timed out after ${_t}s waiting for the host command"
            return 124
        fi
        sleep 0.2
    done
    _rc=$(cat "$UNVME_SHARE/host-done")
    log "host command finished with status $_rc"
    return "${_rc:-1}"
}

# guest_step NAME [TIMEOUT_S]: a rendezvous with a running --host-cmd, for
# scenarios that need the host to act more than once (e.g. restart a server).
# Creates /share/step.NAME, then waits (default 120 s) for the host's
# /share/ack.NAME, whose content is the host's status for that step; returns
# it (124 on timeout).  The host side: tests/lib-host.sh (wait_step, ack_step).
guest_step() {
    : > "$UNVME_SHARE/step.$1.tmp" && mv "$UNVME_SHARE/step.$1.tmp" "$UNVME_SHARE/step.$1"
    log "step $1: waiting for the host"
    _t=${2:-120}
    _end=$(( $(cut -d. -f1 /proc/uptime) + _t ))
    while [ ! -f "$UNVME_SHARE/ack.$1" ]; do
        if [ -f "$UNVME_SHARE/host-done" ] || [ "$(cut -d. -f1 /proc/uptime)" -ge "$_end" ]; then
            log "step $1: no acknowledgement from the host (timeout ${_t}s or host command finished)"
            return 124
        fi
        sleep 0.1
    done
    _rc=$(cat "$UNVME_SHARE/ack.$1")
    log "step $1: host status ${_rc:-?}"
    return "${_rc:-1}"
}

# wait_for PATH [TIMEOUT_S]: wait until PATH exists (e.g. a block device).
wait_for() {
    _i=0
    _n=$(( ${2:-20} * 10 ))
    while [ ! -e "$1" ]; do
        _i=$((_i + 1))
        [ "$_i" -ge "$_n" ] && return 1
        sleep 0.1
    done
    return 0
}

# wait_log FILE PATTERN PID [TIMEOUT_S]: wait until FILE has a line matching
# PATTERN (grep -E) while process PID lives; on failure print FILE and
# return 1.
wait_log() {
    _i=0
    _n=$(( ${4:-30} * 10 ))
    while ! grep -Eq "$2" "$1" 2>/dev/null; do
        _i=$((_i + 1))
        if [ "$_i" -ge "$_n" ] || ! kill -0 "$3" 2>/dev/null; then
            cat "$1" 2>/dev/null
            return 1
        fi
        sleep 0.1
    done
    return 0
}

# ---- kernel NVMe/TCP target (nvmet) via configfs -------------------------
NVMET=/sys/kernel/config/nvmet

# nvmet_ram_backing NAME SIZE_MB: create a RAM-backed file in /dev/shm (tmpfs)
# and print its path.  Use it with buffered_io=1 (nvmet_subsys does).
nvmet_ram_backing() {
    _f=/dev/shm/$1.img
    truncate -s "$2M" "$_f" || fail "truncate $_f"
    echo "$_f"
}

# nvmet_subsys NQN DEVICE_OR_FILE [NSID]: subsystem allowing any host, with one
# namespace on DEVICE_OR_FILE (files get buffered_io=1, needed on tmpfs).
nvmet_subsys() {
    _s=$NVMET/subsystems/$1
    _ns=$_s/namespaces/${3:-1}
    mkdir -p "$_s" || fail "mkdir $_s"
    echo 1 > "$_s/attr_allow_any_host"
    mkdir -p "$_ns" || fail "mkdir $_ns"
    printf '%s' "$2" > "$_ns/device_path"
    if [ -f "$2" ] && [ -e "$_ns/buffered_io" ]; then echo 1 > "$_ns/buffered_io"; fi
    echo 1 > "$_ns/enable" || fail "enable namespace $2 in $1"
}

# nvmet_port ID ADDR SVCID [NQN...]: TCP port (IPv4) exporting the NQNs.
# The kernel only starts listening once a subsystem is linked; every port
# also serves the discovery subsystem.
nvmet_port() {
    _p=$NVMET/ports/$1
    mkdir -p "$_p" || fail "mkdir $_p"
    echo tcp > "$_p/addr_trtype"
    echo ipv4 > "$_p/addr_adrfam"
    echo "$2" > "$_p/addr_traddr"
    echo "$3" > "$_p/addr_trsvcid"
    shift 3
    for _n in "$@"; do
        ln -s "$NVMET/subsystems/$_n" "$_p/subsystems/$_n" || fail "link $_n to port"
    done
}

# nvmet_clear: remove every port, subsystem and namespace.
nvmet_clear() {
    for _l in "$NVMET"/ports/*/subsystems/*; do [ -L "$_l" ] && rm -f "$_l"; done
    for _p in "$NVMET"/ports/*; do [ -d "$_p" ] && rmdir "$_p"; done
    for _ns in "$NVMET"/subsystems/*/namespaces/*; do
        [ -d "$_ns" ] || continue
        echo 0 > "$_ns/enable"; rmdir "$_ns"
    done
    for _s in "$NVMET"/subsystems/*; do [ -d "$_s" ] && rmdir "$_s"; done
    return 0
}

# nvme_dev_for_nqn NQN: print /dev/nvmeXnY of the connected NQN (first ns).
nvme_dev_for_nqn() {
    for _c in /sys/class/nvme/nvme*; do
        [ -f "$_c/subsysnqn" ] || continue
        [ "$(cat "$_c/subsysnqn")" = "$1" ] || continue
        # native multipath: namespaces hang off the subsystem (nvmeXnY)
        for _b in /sys/class/nvme-subsystem/*/nvme*n*; do
            [ -e "$_b" ] || continue
            [ "$(cat "$(dirname "$_b")/subsysnqn")" = "$1" ] && { echo "/dev/$(basename "$_b")"; return 0; }
        done
        for _b in "$_c"/nvme*n*; do
            [ -e "$_b" ] && { echo "/dev/$(basename "$_b")"; return 0; }
        done
    done
    return 1
}
