# shellcheck shell=bash
# tests/lib-spdk.sh — the SPDK peer (qemu-scripts/install-spdk.sh) from shell scripts such as
# bench/core; the Rust tests have the same in tests/common/spdk.rs. Sourced, not run.
#
# Every SPDK program runs as SPDK's peer README says these machines need: no hugepages
# (`--no-huge -s 1024`), apps without PCI scan (`-u`) and without core lock files
# (`--disable-cpumask-locks`, so someone else's SPDK app on the same CPU does not refuse ours), each
# on the one CPU it is given (it busy-polls that CPU at 100%).
#
#   spdk_find                    sets SPDK (the tree with bin/ lib/ scripts/) or returns 1 with one
#                                line on stderr; with CI=true an absent peer also says so as an error
#   spdk_app_start NAME CPU DIR [ARGS…]
#                                starts bin/NAME on CPU with RPC socket DIR/rpc.sock and log
#                                DIR/NAME.log, waits (bounded) for the socket and framework_wait_init;
#                                sets SPDK_APP_PID
#   spdk_rpc DIR LINE…           one rpc.py run, one method call per LINE (rpc.py's syntax)
#   spdk_stop PID                SIGTERM, up to 10 s, then SIGKILL; removes the run files it leaves
#   spdk_tool OUT LIMIT NAME ARGS…
#                                runs host tool bin/NAME (adding `--no-huge -s 1024` for
#                                spdk_nvme_perf and spdk_nvme_identify) with stdout and stderr into
#                                OUT, bounded by LIMIT seconds; returns its status
#   spdk_mask CPU                prints the core mask of CPU (0x…)

spdk_find() {
    local base=${UNVME_SPDK_DIR:-/tmp/unvme-spdk}
    if [[ -x $base/spdk/bin/nvmf_tgt && -f $base/spdk/scripts/rpc.py ]]; then
        SPDK=$base/spdk
        return 0
    fi
    if [[ ${CI:-} == true ]]; then
        echo "error: SPDK peer not installed in $base (CI=true; run qemu-scripts/install-spdk.sh)" >&2
    else
        echo "SPDK peer not installed in $base (run qemu-scripts/install-spdk.sh): SPDK rows skipped" >&2
    fi
    return 1
}

spdk_mask() { printf '0x%x\n' $((1 << $1)); }

# Removes what SPDK process PID leaves once it has exited: DPDK's run dir, SPDK's trace file.
spdk_rm_run_files() {
    rm -rf "/var/run/dpdk/spdk_pid$1"
    rm -f /dev/shm/*_trace.pid"$1"
}

spdk_rpc() {
    local dir=$1
    shift
    printf '%s\n' "$@" | timeout 60 python3 "$SPDK/scripts/rpc.py" -s "$dir/rpc.sock" -t 30
}

spdk_app_start() {
    local name=$1 cpu=$2 dir=$3 i
    shift 3
    mkdir -p "$dir"
    LD_LIBRARY_PATH=$SPDK/lib "$SPDK/bin/$name" -m "$(spdk_mask "$cpu")" -u --no-huge -s 1024 \
        --disable-cpumask-locks -r "$dir/rpc.sock" "$@" >"$dir/$name.log" 2>&1 &
    SPDK_APP_PID=$!
    for ((i = 0; i < 1500; i++)); do
        [[ -S $dir/rpc.sock ]] && break
        kill -0 "$SPDK_APP_PID" 2>/dev/null || { echo "SPDK $name exited at start:" >&2; tail -n 5 "$dir/$name.log" >&2; return 1; }
        sleep 0.02
    done
    [[ -S $dir/rpc.sock ]] || { echo "SPDK $name: no RPC socket after 30 s" >&2; return 1; }
    spdk_rpc "$dir" framework_wait_init >/dev/null
}

spdk_stop() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 500; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.02
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    spdk_rm_run_files "$pid"
}

spdk_tool() {
    local out=$1 limit=$2 name=$3 rc=0 pidfile
    shift 3
    local mem=()
    case $name in spdk_nvme_perf | spdk_nvme_identify) mem=(--no-huge -s 1024) ;; esac
    pidfile=$(mktemp)
    # The tool runs as the exec'd shell, so its pid (which names its run dir) is known.
    # shellcheck disable=SC2016  # $$ and $@ belong to the inner shell
    LD_LIBRARY_PATH=$SPDK/lib timeout -k 5 "$limit" bash -c 'echo $$ >"$1"; shift; exec "$@"' _ \
        "$pidfile" "$SPDK/bin/$name" "${mem[@]}" "$@" >"$out" 2>&1 || rc=$?
    [[ -s $pidfile ]] && spdk_rm_run_files "$(cat "$pidfile")"
    rm -f "$pidfile"
    return "$rc"
}
