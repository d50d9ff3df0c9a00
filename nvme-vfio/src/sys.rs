//! The VFIO plumbing: container, IOMMU group, device fd, BAR0 MMIO, PCI
//! config space and IOMMU DMA mappings (Linux `include/uapi/linux/vfio.h`,
//! structures from the `vfio-bindings` crate, ioctls through `libc::ioctl`).
//!
//! Every `unsafe` of the VFIO backend that touches the kernel or a device
//! lives here or in [`super::dma`]; the controller and queue code only calls
//! the safe wrappers.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;

use vfio_bindings::bindings::vfio as vb;

use super::Error;

/// `_IO(VFIO_TYPE, VFIO_BASE + n)`: VFIO ioctls carry no size/direction bits.
const fn vfio_io(n: u32) -> libc::c_ulong {
    ((vb::VFIO_TYPE as u32) << 8 | (vb::VFIO_BASE + n)) as libc::c_ulong
}
const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const VFIO_DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

/// PCI config space Command register offset and the bits we set.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// First IOVA handed out: above 4 GiB, clear of the x86 MSI window
/// (0xfee00000) and of low reserved regions; far below the 39-bit address
/// width of the smallest common IOMMU.
const IOVA_BASE: u64 = 1 << 32;

fn last_os_error(what: &'static str) -> Error {
    Error::Ioctl {
        what,
        source: io::Error::last_os_error(),
    }
}

/// Issues an ioctl whose argument is a pointer to `arg`.
///
/// Callers pass only the VFIO request codes above together with the
/// `vfio-bindings` structure (or integer) that request expects, so the
/// kernel reads/writes exactly `size_of::<T>()` bytes (`argsz` says so).
fn ioctl_ptr<T>(fd: &impl AsRawFd, req: libc::c_ulong, arg: &mut T) -> libc::c_int {
    // SAFETY: `fd` is an open descriptor we own; `arg` is a valid, exclusive, properly sized and aligned object for the duration of the call, and the request codes used with this helper take a pointer to exactly that type.
    unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg as *mut T) }
}

/// Issues an ioctl whose argument is an integer value.
fn ioctl_val(fd: &impl AsRawFd, req: libc::c_ulong, arg: libc::c_ulong) -> libc::c_int {
    // SAFETY: the requests used with this helper (GET_API_VERSION, CHECK_EXTENSION, SET_IOMMU) take an integer, not a pointer, so the kernel dereferences nothing of ours.
    unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) }
}

fn open_rw(path: &Path, hint: &'static str) -> Result<File, Error> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            hint: match source.kind() {
                io::ErrorKind::PermissionDenied => {
                    " (permission denied: run as root, or give your user the VFIO group device)"
                }
                io::ErrorKind::NotFound => hint,
                _ if source.raw_os_error() == Some(libc::EBUSY) => {
                    " (busy: another process has the device open)"
                }
                _ => "",
            },
            source,
        })
}

/// The sysfs facts about a PCI device we need before opening it.
#[derive(Debug)]
pub(crate) struct PciDevice {
    /// `DDDD:BB:DD.F`.
    pub addr: String,
    /// The IOMMU group number.
    pub group: u32,
}

/// Checks `/sys/bus/pci/devices/ADDR`: present, bound to vfio-pci, in an
/// IOMMU group. Each failure has its own error and advice.
pub(crate) fn probe_pci(addr: &str) -> Result<PciDevice, Error> {
    let dir = PathBuf::from("/sys/bus/pci/devices").join(addr);
    if !dir.exists() {
        return Err(Error::DeviceAbsent { addr: addr.into() });
    }
    let driver = std::fs::read_link(dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    match driver.as_deref() {
        Some("vfio-pci") => {}
        Some(d) => {
            return Err(Error::WrongDriver {
                addr: addr.into(),
                driver: d.into(),
            })
        }
        None => return Err(Error::Unbound { addr: addr.into() }),
    }
    let group = std::fs::read_link(dir.join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok())
        .ok_or_else(|| Error::NoIommuGroup { addr: addr.into() })?;
    Ok(PciDevice {
        addr: addr.into(),
        group,
    })
}

/// A VFIO container with its IOMMU set; DMA mappings are made through it.
#[derive(Debug)]
pub(crate) struct Container {
    fd: File,
    next_iova: Mutex<u64>,
}

impl Container {
    /// Maps `len` bytes at `vaddr` into the IOMMU for device reads and
    /// writes and returns the IOVA chosen for them. The kernel pins the pages.
    ///
    /// # Safety
    ///
    /// From the call on, the device may read and write `vaddr..vaddr+len`
    /// at any time, behind the compiler's back. So the range must be memory
    /// this process mapped for the purpose (not the backing of any Rust
    /// object that assumes exclusive access), must stay mapped until
    /// [`Container::unmap_dma`] has been called for the returned IOVA, and
    /// must be accessed meanwhile only through raw, volatile-safe accesses
    /// (see [`super::dma::DmaRegion`]).
    pub unsafe fn map_dma(&self, vaddr: *mut u8, len: usize) -> Result<u64, Error> {
        let iova = {
            let mut next = self
                .next_iova
                .lock()
                .map_err(|_| Error::Dma("IOVA allocator poisoned".into()))?;
            let iova = *next;
            // IOVAs are never reused: a process maps a handful of queues, and
            // the space above 4 GiB is vast next to that.
            *next += (len as u64).next_multiple_of(2 << 20);
            iova
        };
        let mut map = vb::vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vb::vfio_iommu_type1_dma_map>() as u32,
            flags: vb::VFIO_DMA_MAP_FLAG_READ | vb::VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size: len as u64,
        };
        if ioctl_ptr(&self.fd, VFIO_IOMMU_MAP_DMA, &mut map) != 0 {
            return Err(last_os_error("VFIO_IOMMU_MAP_DMA"));
        }
        Ok(iova)
    }

    /// Removes a mapping made by [`Container::map_dma`].
    pub fn unmap_dma(&self, iova: u64, len: usize) {
        let mut unmap = vb::vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vb::vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size: len as u64,
            ..Default::default()
        };
        if ioctl_ptr(&self.fd, VFIO_IOMMU_UNMAP_DMA, &mut unmap) != 0 {
            tracing::warn!(iova, len, error = %io::Error::last_os_error(), "VFIO_IOMMU_UNMAP_DMA failed");
        }
    }
}

/// An open VFIO PCI device: group, device fd, BAR0 mapping, config space.
#[derive(Debug)]
pub(crate) struct VfioDevice {
    /// BAR0 (the NVMe registers), mapped; unmapped first on drop.
    pub bar0: Mmio,
    device: File,
    config_offset: u64,
    _group: File,
    /// The container (shared with every DMA region).
    pub container: std::sync::Arc<Container>,
}

impl VfioDevice {
    /// Opens the device: container, group (viable?), IOMMU type, device fd,
    /// region info, BAR0 mapping.
    pub fn open(pci: &PciDevice) -> Result<Self, Error> {
        let container = open_rw(
            Path::new("/dev/vfio/vfio"),
            " (no VFIO: load it with `modprobe vfio-pci`)",
        )?;
        let version = ioctl_val(&container, VFIO_GET_API_VERSION, 0);
        if version != vb::VFIO_API_VERSION as i32 {
            return Err(Error::Unsupported(format!(
                "VFIO API version {version}, expected {}",
                vb::VFIO_API_VERSION
            )));
        }
        let group_path = PathBuf::from(format!("/dev/vfio/{}", pci.group));
        let group = open_rw(
            &group_path,
            " (no group device: is vfio-pci loaded and the device bound to it?)",
        )?;
        let mut status = vb::vfio_group_status {
            argsz: std::mem::size_of::<vb::vfio_group_status>() as u32,
            flags: 0,
        };
        if ioctl_ptr(&group, VFIO_GROUP_GET_STATUS, &mut status) != 0 {
            return Err(last_os_error("VFIO_GROUP_GET_STATUS"));
        }
        if status.flags & vb::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::GroupNotViable { group: pci.group });
        }
        let mut cfd: libc::c_int = container.as_raw_fd();
        if ioctl_ptr(&group, VFIO_GROUP_SET_CONTAINER, &mut cfd) != 0 {
            return Err(last_os_error("VFIO_GROUP_SET_CONTAINER"));
        }
        let iommu = [vb::VFIO_TYPE1v2_IOMMU, vb::VFIO_TYPE1_IOMMU]
            .into_iter()
            .find(|&t| ioctl_val(&container, VFIO_CHECK_EXTENSION, t.into()) > 0)
            .ok_or_else(|| {
                Error::Unsupported(
                    "the VFIO container offers no type1 IOMMU (load it: modprobe vfio_iommu_type1)"
                        .into(),
                )
            })?;

        if ioctl_val(&container, VFIO_SET_IOMMU, iommu.into()) != 0 {
            return Err(last_os_error("VFIO_SET_IOMMU"));
        }
        let name = CString::new(pci.addr.as_str())
            .map_err(|_| Error::Spec(format!("PCI address {:?} contains NUL", pci.addr)))?;
        let device = {
            // SAFETY: GROUP_GET_DEVICE_FD takes a NUL-terminated string that the kernel only reads; `name` outlives the call.
            let fd = unsafe {
                libc::ioctl(
                    group.as_raw_fd(),
                    VFIO_GROUP_GET_DEVICE_FD as _,
                    name.as_ptr(),
                )
            };
            if fd < 0 {
                return Err(last_os_error("VFIO_GROUP_GET_DEVICE_FD"));
            }
            // SAFETY: the kernel returned a fresh descriptor that nothing else owns.
            File::from(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
        };
        let mut info = vb::vfio_device_info {
            argsz: std::mem::size_of::<vb::vfio_device_info>() as u32,
            ..Default::default()
        };
        if ioctl_ptr(&device, VFIO_DEVICE_GET_INFO, &mut info) != 0 {
            return Err(last_os_error("VFIO_DEVICE_GET_INFO"));
        }
        if info.flags & vb::VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(Error::Unsupported(format!(
                "{} is not a VFIO PCI device",
                pci.addr
            )));
        }
        let bar = region_info(&device, vb::VFIO_PCI_BAR0_REGION_INDEX)?;
        let config = region_info(&device, vb::VFIO_PCI_CONFIG_REGION_INDEX)?;
        if bar.flags & vb::VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.size < 0x2000 {
            return Err(Error::Unsupported(format!(
                "BAR0 of {} cannot be mapped (flags {:#x}, size {:#x})",
                pci.addr, bar.flags, bar.size
            )));
        }
        let bar0 = Mmio::map(&device, bar.offset, bar.size as usize)?;
        let container = std::sync::Arc::new(Container {
            fd: container,
            next_iova: Mutex::new(IOVA_BASE),
        });
        tracing::debug!(addr = %pci.addr, group = pci.group, iommu, bar0_size = bar.size, "vfio device open");
        Ok(VfioDevice {
            bar0,
            device,
            config_offset: config.offset,
            _group: group,
            container,
        })
    }

    /// Sets Memory Space Enable and Bus Master Enable (and disables INTx:
    /// this driver polls) in the PCI Command register.
    pub fn enable_bus_master(&self) -> Result<(), Error> {
        let mut b = [0u8; 2];
        self.device
            .read_exact_at(&mut b, self.config_offset + PCI_COMMAND)
            .map_err(|source| Error::Ioctl {
                what: "read PCI command register",
                source,
            })?;
        let cmd = u16::from_le_bytes(b)
            | PCI_COMMAND_MEMORY
            | PCI_COMMAND_MASTER
            | PCI_COMMAND_INTX_DISABLE;
        self.device
            .write_all_at(&cmd.to_le_bytes(), self.config_offset + PCI_COMMAND)
            .map_err(|source| Error::Ioctl {
                what: "write PCI command register",
                source,
            })
    }
}

fn region_info(device: &File, index: u32) -> Result<vb::vfio_region_info, Error> {
    let mut r = vb::vfio_region_info {
        argsz: std::mem::size_of::<vb::vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    if ioctl_ptr(device, VFIO_DEVICE_GET_REGION_INFO, &mut r) != 0 {
        return Err(last_os_error("VFIO_DEVICE_GET_REGION_INFO"));
    }
    Ok(r)
}

/// A mapped MMIO region (BAR0). Accesses are volatile, 32-bit, bounds- and
/// alignment-checked; an access outside the region reads all ones and
/// writes nothing (the same as a device that went away).
#[derive(Debug)]
pub(crate) struct Mmio {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is process-wide device memory; it is only accessed through volatile reads/writes of single registers, which are atomic with respect to the device, and the NVMe registers we write from several threads (each queue's own doorbell; controller registers under the admin mutex) are disjoint.
unsafe impl Send for Mmio {}
// SAFETY: as for Send: `&Mmio` only allows volatile single-register accesses.
unsafe impl Sync for Mmio {}

impl Mmio {
    fn map(device: &File, offset: u64, len: usize) -> Result<Self, Error> {
        // SAFETY: a fresh shared mapping of the device fd's BAR0 region at the offset VFIO told us; it does not alias any Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_os_error("mmap BAR0"));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| last_os_error("mmap BAR0"))?;
        Ok(Mmio { ptr, len })
    }

    fn in_range(&self, off: usize, size: usize) -> bool {
        off.is_multiple_of(size) && off.checked_add(size).is_some_and(|e| e <= self.len)
    }

    /// Reads the 32-bit register at `off` ([`unvme_proto::regs`] offsets).
    pub fn read32(&self, off: u32) -> u32 {
        self.load(off as usize)
    }

    /// Writes the 32-bit register at `off`.
    pub fn write32(&self, off: u32, v: u32) {
        self.store(off as usize, v)
    }

    /// Reads a 64-bit register as two 32-bit reads, low dword first.
    pub fn read64(&self, off: u32) -> u64 {
        u64::from(self.read32(off)) | (u64::from(self.read32(off + 4)) << 32)
    }

    /// Writes a 64-bit register as two 32-bit writes, low dword first.
    pub fn write64(&self, off: u32, v: u64) {
        self.write32(off, v as u32);
        self.write32(off + 4, (v >> 32) as u32);
    }

    /// Writes a doorbell (offset from [`unvme_proto::regs::Cap::sq_doorbell`]
    /// or `cq_doorbell`).
    pub fn ring(&self, doorbell: u64, v: u32) {
        match usize::try_from(doorbell) {
            Ok(off) => self.store(off, v),
            Err(_) => tracing::warn!(doorbell, "doorbell outside BAR0; not written"),
        }
    }

    /// Volatile 32-bit read at byte `off` (all ones outside the region).
    fn load(&self, off: usize) -> u32 {
        if !self.in_range(off, 4) {
            return u32::MAX;
        }
        // SAFETY: `off` is 4-aligned and inside the live mapping (checked above); a volatile read of device memory has no Rust-level aliasing.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(off).cast::<u32>()) }
    }

    /// Volatile 32-bit write at byte `off` (nothing outside the region).
    fn store(&self, off: usize, v: u32) {
        if !self.in_range(off, 4) {
            return;
        }
        // SAFETY: as in `load`: aligned, in range, volatile device access.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(off).cast::<u32>(), v) }
    }
}

impl Drop for Mmio {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
