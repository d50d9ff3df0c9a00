#!/bin/sh
# vfio-bind.sh: hand a PCI device (an NVMe SSD) to vfio-pci so that
# `unvme target --vfio ADDR` can drive it from user space, or give it back.
#
#   vfio-bind.sh ADDR            bind ADDR (e.g. 0000:00:04.0) to vfio-pci
#   vfio-bind.sh --unbind ADDR   release it from vfio-pci and let the kernel
#                                reprobe it (the nvme driver takes it again)
#
# Runs as root, in POSIX sh (also under busybox, in the QEMU guest).
# Exit status: 0 done; 1 usage; 2 device absent; 3 no IOMMU group;
# 4 vfio-pci module missing; 5 the kernel refused the bind/unbind.
set -eu

die() { rc=$1; shift; echo "vfio-bind: $*" >&2; exit "$rc"; }
say() { echo "vfio-bind: $*"; }

unbind=0
if [ "${1:-}" = "--unbind" ]; then
    unbind=1
    shift
fi
[ $# -eq 1 ] || die 1 "usage: vfio-bind.sh [--unbind] DDDD:BB:DD.F"
addr=$1
case $addr in
    ????:??:??.?) ;;
    ??:??.?) addr=0000:$addr ;;
    *) die 1 "'$1' is not a PCI address (DDDD:BB:DD.F, e.g. 0000:00:04.0)" ;;
esac
dev=/sys/bus/pci/devices/$addr
[ -e "$dev" ] || die 2 "no PCI device $addr (not in /sys/bus/pci/devices; check lspci)"
[ "$(id -u)" = 0 ] || die 1 "must run as root (writes to sysfs)"

driver() { # the driver ADDR is bound to, or nothing
    if [ -e "$dev/driver" ]; then basename "$(readlink "$dev/driver")"; fi
}

if [ "$unbind" = 1 ]; then
    cur=$(driver)
    if [ "$cur" = vfio-pci ]; then
        echo "$addr" > "$dev/driver/unbind" \
            || die 5 "unbinding $addr from vfio-pci failed (is a process, e.g. unvme target, still using it?)"
    elif [ -n "$cur" ]; then
        say "$addr is bound to $cur, not vfio-pci; nothing to release"
    fi
    [ -e "$dev/driver_override" ] && echo > "$dev/driver_override"
    echo "$addr" > /sys/bus/pci/drivers_probe 2>/dev/null || true
    now=$(driver)
    say "$addr released from vfio-pci; now bound to: ${now:-no driver (load nvme: modprobe nvme)}"
    exit 0
fi

[ -e "$dev/iommu_group" ] \
    || die 3 "$addr has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line; in QEMU: -M q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on)"
group=$(basename "$(readlink "$dev/iommu_group")")

if [ ! -d /sys/bus/pci/drivers/vfio-pci ]; then
    modprobe vfio-pci 2>/dev/null || true
    [ -d /sys/bus/pci/drivers/vfio-pci ] \
        || die 4 "the vfio-pci module is missing (modprobe vfio-pci failed; is CONFIG_VFIO_PCI built for this kernel?)"
fi

# The type1 IOMMU backend is loaded on demand (asynchronously) by vfio;
# load it now so the container offers it at once.
modprobe vfio_iommu_type1 2>/dev/null || true

cur=$(driver)
if [ "$cur" = vfio-pci ]; then
    say "$addr is already bound to vfio-pci (IOMMU group $group, /dev/vfio/$group)"
    exit 0
fi
if [ -n "$cur" ]; then
    say "$addr is bound to $cur; unbinding it (its block devices disappear; unmount them first)"
    echo "$addr" > "$dev/driver/unbind" || die 5 "unbinding $addr from $cur failed"
fi
echo vfio-pci > "$dev/driver_override" || die 5 "cannot set driver_override of $addr"
echo "$addr" > /sys/bus/pci/drivers_probe 2>/dev/null || true
now=$(driver)
[ "$now" = vfio-pci ] || die 5 "$addr did not bind to vfio-pci (now: ${now:-no driver}); see dmesg"

# A group is usable only if every device in it is bound to vfio-pci (or none).
for other in /sys/kernel/iommu_groups/"$group"/devices/*; do
    o=$(basename "$other")
    [ "$o" = "$addr" ] && continue
    d=
    if [ -e "$other/driver" ]; then d=$(basename "$(readlink "$other/driver")"); fi
    case $d in
        ''|vfio-pci|pcieport) ;;
        *) say "warning: $o in the same IOMMU group $group is bound to $d; the group is not viable until it is bound to vfio-pci too" ;;
    esac
done
i=0
while [ ! -e "/dev/vfio/$group" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -e "/dev/vfio/$group" ] || die 5 "/dev/vfio/$group did not appear"
say "$addr bound to vfio-pci (IOMMU group $group, /dev/vfio/$group)"
