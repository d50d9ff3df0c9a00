//! Controller bring-up, written once for every transport: read CAP and VS,
//! set CC.EN and wait for CSTS.RDY within CAP.TO, Identify Controller, and
//! ask for I/O queues (Set Features, Number of Queues); disable and normal
//! shutdown likewise (NVMe Base 2.0 §3.5.1 "Memory-based Controller
//! Initialization", §3.5.2 "Message-based Controller Initialization",
//! §3.6 "Shutdown Processing").
//!
//! A transport implements [`ControllerAccess`]: register reads and writes
//! (MMIO for PCIe, Property Get/Set for Fabrics), one admin command to
//! completion, and a pause between polls of CSTS. What only one transport
//! has stays with it: the Fabrics Connect before any of this, the admin
//! queue memory and AQA/ASQ/ACQ of a PCIe controller
//! ([`ControllerAccess::before_enable`]), and how I/O queues come to exist
//! (a Connect per queue, or Create I/O CQ/SQ).
//!
//! Waiting is counted in the pauses the routine asks for (a CAP.TO of 10 s
//! is 10 000 pauses of 1 ms), not read from a clock, so a test drives the
//! whole sequence without sleeping; register accesses only make the real
//! wait longer, never shorter.

use std::time::Duration;

use crate::admin::{cns, fid, IdentifyController, NumberOfQueues, IDENTIFY_DATA_SIZE};
use crate::nvm;
use crate::nvme::{Cqe, Sqe};
use crate::regs::{self, cc, csts, Cap, Cc};

/// Pause between two reads of CSTS while waiting for it.
pub const POLL_INTERVAL: Duration = Duration::from_millis(1);

/// Which wait for CSTS ran out of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// CC.EN = 1, waiting for CSTS.RDY = 1.
    Enable,
    /// CC.EN = 0, waiting for CSTS.RDY = 0.
    Disable,
    /// CC.SHN = normal, waiting for CSTS.SHST = complete.
    Shutdown,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Enable => "enable",
            Step::Disable => "disable",
            Step::Shutdown => "shutdown",
        })
    }
}

/// How bring-up fails apart from the transport's own errors; a transport's
/// error type converts from it ([`ControllerAccess::Error`]).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum BringUpError {
    /// CAP or CSTS read as all ones: the device is gone.
    #[error("the device is gone (registers read all ones: removed or link down)")]
    Gone,
    /// CSTS.CFS while enabling.
    #[error("controller fatal status (CSTS.CFS)")]
    Fatal,
    /// CSTS did not reach the state within the time allowed.
    #[error("controller {step} timed out after {ms} ms (CAP.TO; CSTS {csts:#x})")]
    Timeout {
        /// The wait that ran out.
        step: Step,
        /// Time allowed.
        ms: u64,
        /// The last CSTS read.
        csts: u32,
    },
    /// Identify Controller data that does not decode.
    #[error("Identify Controller: {source}")]
    Decode {
        /// The decoder's error.
        #[source]
        source: crate::Error,
    },
}

/// What bring-up needs of a controller's transport.
pub trait ControllerAccess {
    /// The transport's error; bring-up's own failures convert into it.
    type Error: From<BringUpError>;

    /// Reads the 32-bit register at `off` ([`regs`] offsets).
    fn read32(&mut self, off: u32) -> Result<u32, Self::Error>;

    /// Reads the 64-bit register at `off` (CAP).
    fn read64(&mut self, off: u32) -> Result<u64, Self::Error>;

    /// Writes the 32-bit register at `off` (CC).
    fn write32(&mut self, off: u32, value: u32) -> Result<(), Self::Error>;

    /// Runs one admin command to completion and returns its CQE; the
    /// transport fills in the command identifier and data pointer. `data`,
    /// if given, receives the command's controller-to-host data
    /// (`data.len()` bytes). A completion with an error status is the
    /// transport's error, as is a command that does not complete in time.
    fn admin(&mut self, sqe: Sqe, data: Option<&mut [u8]>) -> Result<Cqe, Self::Error>;

    /// Pauses for `d` between two polls of CSTS.
    fn wait(&mut self, d: Duration);

    /// Runs between reading CAP/VS and setting CC.EN: what the transport
    /// must do to a controller before enabling it (a PCIe host disables it
    /// and programs the admin queue: AQA, ASQ, ACQ). The default does
    /// nothing, which is right for a fresh Fabrics controller.
    fn before_enable(&mut self, _cap: &Cap) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// A controller that [`bring_up`] enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BroughtUp {
    /// CAP as read.
    pub cap_raw: u64,
    /// CAP decoded.
    pub cap: Cap,
    /// VS.
    pub vs: u32,
    /// The CC value written to enable it.
    pub cc: u32,
    /// Identify Controller data.
    pub id: IdentifyController,
    /// I/O queue pairs granted (at most what was asked for; 0 when none was).
    pub io_queues: u32,
}

/// Brings a disabled (or, with a [`ControllerAccess::before_enable`] that
/// disables it, any) controller up: CAP, VS, `before_enable`, CC.EN with
/// [`Cc::nvm_enable`], CSTS.RDY within CAP.TO, Identify Controller, and
/// Set Features (Number of Queues) for `want_io_queues(&identify)` I/O
/// queue pairs unless that is 0 (a discovery controller has none).
pub fn bring_up<C: ControllerAccess>(
    c: &mut C,
    want_io_queues: impl FnOnce(&IdentifyController) -> u32,
) -> Result<BroughtUp, C::Error> {
    let cap_raw = c.read64(regs::CAP)?;
    if cap_raw == u64::MAX {
        return Err(BringUpError::Gone.into());
    }
    let cap = Cap::decode(cap_raw);
    let vs = c.read32(regs::VS)?;
    c.before_enable(&cap)?;
    let cc = enable(c, &cap)?;
    let id = identify_controller(c)?;
    let want = want_io_queues(&id);
    let io_queues = if want > 0 {
        set_queue_count(c, want)?
    } else {
        0
    };
    Ok(BroughtUp {
        cap_raw,
        cap,
        vs,
        cc,
        id,
        io_queues,
    })
}

/// Writes CC with [`Cc::nvm_enable`] and waits for CSTS.RDY (CSTS.CFS is
/// fatal) within CAP.TO; returns the CC value written.
pub fn enable<C: ControllerAccess>(c: &mut C, cap: &Cap) -> Result<u32, C::Error> {
    let v = Cc::nvm_enable().encode();
    c.write32(regs::CC, v)?;
    wait_csts(c, cap.ready_timeout(), Step::Enable, |s| s & csts::RDY != 0)?;
    Ok(v)
}

/// Clears CC.EN (and CC.SHN) and waits for CSTS.RDY = 0 within CAP.TO.
/// CSTS.CFS does not matter here: a controller being reset may have it set.
pub fn disable<C: ControllerAccess>(c: &mut C, cap: &Cap) -> Result<(), C::Error> {
    let v = c.read32(regs::CC)?;
    if regs::gone(v) {
        return Err(BringUpError::Gone.into());
    }
    c.write32(regs::CC, v & !cc::EN & !cc::SHN_MASK)?;
    wait_csts(c, cap.ready_timeout(), Step::Disable, |s| {
        s & csts::RDY == 0
    })
}

/// Normal shutdown: CC.SHN = 01b on top of `cc_value` (the CC in force),
/// then waits up to `limit` for CSTS.SHST = shutdown complete.
pub fn shutdown<C: ControllerAccess>(
    c: &mut C,
    cc_value: u32,
    limit: Duration,
) -> Result<(), C::Error> {
    c.write32(regs::CC, (cc_value & !cc::SHN_MASK) | cc::SHN_NORMAL)?;
    wait_csts(c, limit, Step::Shutdown, |s| {
        s & csts::SHST_MASK == csts::SHST_COMPLETE
    })
}

/// Identify Controller, decoded.
pub fn identify_controller<C: ControllerAccess>(c: &mut C) -> Result<IdentifyController, C::Error> {
    let mut data = [0u8; IDENTIFY_DATA_SIZE];
    c.admin(nvm::identify(cns::CTRL, 0, 0), Some(&mut data))?;
    IdentifyController::decode(&data).map_err(|source| BringUpError::Decode { source }.into())
}

/// Set Features (Number of Queues) asking for `want` I/O submission and
/// completion queues; returns the pairs granted, at most `want`.
pub fn set_queue_count<C: ControllerAccess>(c: &mut C, want: u32) -> Result<u32, C::Error> {
    let nq = NumberOfQueues::from_counts(want, want).to_dword();
    let cqe = c.admin(nvm::set_features(fid::NUM_QUEUES, 0, nq, false), None)?;
    let got = NumberOfQueues::from_dword(cqe.dw0);
    Ok(got.sq_count().min(got.cq_count()).min(want))
}

/// Polls CSTS until `done`, all ones (gone) or, while enabling, CFS; at
/// most `timeout` counted in [`POLL_INTERVAL`] pauses.
fn wait_csts<C: ControllerAccess>(
    c: &mut C,
    timeout: Duration,
    step: Step,
    done: impl Fn(u32) -> bool,
) -> Result<(), C::Error> {
    let mut waited = Duration::ZERO;
    loop {
        let s = c.read32(regs::CSTS)?;
        if regs::gone(s) {
            return Err(BringUpError::Gone.into());
        }
        if done(s) {
            return Ok(());
        }
        if step == Step::Enable && s & csts::CFS != 0 {
            return Err(BringUpError::Fatal.into());
        }
        if waited >= timeout {
            return Err(BringUpError::Timeout {
                step,
                ms: timeout.as_millis() as u64,
                csts: s,
            }
            .into());
        }
        c.wait(POLL_INTERVAL);
        waited += POLL_INTERVAL;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin;

    /// A controller model: CC/CSTS behave as the specification says after
    /// `delay` polls, admin commands answer Identify and Number of Queues.
    struct Model {
        cap: u64,
        cc: u32,
        csts: u32,
        /// CSTS reads before a CC change takes effect.
        delay: u32,
        pending: u32,
        /// What was done, in order.
        log: Vec<String>,
        waited: Duration,
        granted: u32,
        cfs_on_enable: bool,
        gone: bool,
    }

    #[derive(Debug, PartialEq)]
    enum TestError {
        BringUp(BringUpError),
    }

    impl From<BringUpError> for TestError {
        fn from(e: BringUpError) -> Self {
            TestError::BringUp(e)
        }
    }

    impl Model {
        fn new(delay: u32) -> Self {
            Model {
                cap: regs::cap_value(63, 2),
                cc: 0,
                csts: 0,
                delay,
                pending: 0,
                log: Vec::new(),
                waited: Duration::ZERO,
                granted: 8,
                cfs_on_enable: false,
                gone: false,
            }
        }

        fn settle(&mut self) {
            if self.pending > 0 {
                self.pending -= 1;
                return;
            }
            let cc = Cc::decode(self.cc);
            if cc.en && self.cfs_on_enable {
                self.csts |= csts::CFS;
            } else if cc.en {
                self.csts |= csts::RDY;
            } else {
                self.csts &= !csts::RDY;
            }
            if cc.shn == 1 {
                self.csts = (self.csts & !csts::SHST_MASK) | csts::SHST_COMPLETE;
            }
        }
    }

    impl ControllerAccess for Model {
        type Error = TestError;

        fn read32(&mut self, off: u32) -> Result<u32, TestError> {
            self.log.push(format!("r{off:#x}"));
            if self.gone {
                return Ok(u32::MAX);
            }
            Ok(match off {
                regs::VS => regs::NVME_VERSION_2_0,
                regs::CC => self.cc,
                regs::CSTS => {
                    self.settle();
                    self.csts
                }
                _ => 0,
            })
        }

        fn read64(&mut self, off: u32) -> Result<u64, TestError> {
            self.log.push(format!("r{off:#x}"));
            Ok(if self.gone { u64::MAX } else { self.cap })
        }

        fn write32(&mut self, off: u32, value: u32) -> Result<(), TestError> {
            self.log.push(format!("w{off:#x}={value:#x}"));
            if off == regs::CC {
                self.cc = value;
                self.pending = self.delay;
            }
            Ok(())
        }

        fn admin(&mut self, sqe: Sqe, data: Option<&mut [u8]>) -> Result<Cqe, TestError> {
            self.log.push(format!("admin{:#x}", sqe.opc));
            let mut cqe = Cqe::default();
            match sqe.opc {
                admin::opc::IDENTIFY => {
                    assert_eq!(
                        admin::Identify::from_cdws(sqe.cdw10, sqe.cdw11).cns,
                        cns::CTRL
                    );
                    let id = IdentifyController {
                        sn: "SN1".into(),
                        mn: "model".into(),
                        ..IdentifyController::default()
                    };
                    let d = data.expect("Identify has data");
                    d.copy_from_slice(&id.to_bytes());
                }
                admin::opc::SET_FEATURES => {
                    assert_eq!(sqe.cdw10 & 0xFF, u32::from(fid::NUM_QUEUES));
                    let asked = NumberOfQueues::from_dword(sqe.cdw11);
                    let n = asked.sq_count().min(self.granted);
                    cqe.dw0 = NumberOfQueues::from_counts(n, n).to_dword();
                }
                other => panic!("unexpected admin opcode {other:#x}"),
            }
            Ok(cqe)
        }

        fn wait(&mut self, d: Duration) {
            self.waited += d;
        }

        fn before_enable(&mut self, cap: &Cap) -> Result<(), TestError> {
            self.log.push(format!("before_enable mqes={}", cap.mqes));
            Ok(())
        }
    }

    #[test]
    fn bring_up_enables_identifies_and_asks_for_queues_in_order() {
        let mut m = Model::new(3);
        let up = bring_up(&mut m, |id| {
            assert_eq!(id.sn, "SN1");
            4
        })
        .unwrap();
        assert_eq!(up.cap, Cap::decode(regs::cap_value(63, 2)));
        assert_eq!(up.vs, regs::NVME_VERSION_2_0);
        assert_eq!(up.cc, 1 | (6 << 16) | (4 << 20));
        assert_eq!(up.id.mn, "model");
        assert_eq!(
            up.io_queues, 4,
            "granted 8, asked 4: at most what was asked"
        );
        // CAP, VS, the transport's part, CC, CSTS until RDY, then admin.
        assert_eq!(
            &m.log[..4],
            ["r0x0", "r0x8", "before_enable mqes=63", "w0x14=0x460001"]
        );
        let polls = m.log.iter().filter(|l| *l == "r0x1c").count();
        assert_eq!(polls, 4, "RDY after three CSTS reads that saw it clear");
        assert_eq!(m.waited, 3 * POLL_INTERVAL);
        assert_eq!(&m.log[m.log.len() - 2..], ["admin0x6", "admin0x9"]);
    }

    #[test]
    fn fewer_queues_granted_than_asked_and_none_asked_for_discovery() {
        let mut m = Model::new(0);
        m.granted = 2;
        assert_eq!(bring_up(&mut m, |_| 64).unwrap().io_queues, 2);
        let mut m = Model::new(0);
        assert_eq!(bring_up(&mut m, |_| 0).unwrap().io_queues, 0);
        assert!(!m.log.iter().any(|l| l == "admin0x9"), "no Set Features");
    }

    #[test]
    fn a_controller_that_never_gets_ready_times_out_after_cap_to() {
        let mut m = Model::new(u32::MAX);
        let e = bring_up(&mut m, |_| 1).unwrap_err();
        assert_eq!(
            e,
            TestError::BringUp(BringUpError::Timeout {
                step: Step::Enable,
                ms: 1000,
                csts: 0
            })
        );
        assert_eq!(m.waited, Duration::from_millis(1000), "CAP.TO 2 = 1 s");
    }

    #[test]
    fn fatal_status_and_a_vanished_device_end_bring_up() {
        let mut m = Model::new(0);
        m.cfs_on_enable = true;
        assert_eq!(
            bring_up(&mut m, |_| 1).unwrap_err(),
            TestError::BringUp(BringUpError::Fatal)
        );
        let mut m = Model::new(0);
        m.gone = true;
        assert_eq!(
            bring_up(&mut m, |_| 1).unwrap_err(),
            TestError::BringUp(BringUpError::Gone)
        );
        assert_eq!(m.log, ["r0x0"], "nothing after CAP read all ones");
    }

    #[test]
    fn disable_and_shutdown_wait_for_their_status() {
        let mut m = Model::new(2);
        let cap = Cap::decode(m.cap);
        let cc = enable(&mut m, &cap).unwrap();
        assert!(m.csts & csts::RDY != 0);
        shutdown(&mut m, cc, Duration::from_secs(1)).unwrap();
        assert_eq!(m.cc & cc::SHN_MASK, cc::SHN_NORMAL);
        assert_eq!(m.csts & csts::SHST_MASK, csts::SHST_COMPLETE);
        disable(&mut m, &cap).unwrap();
        assert_eq!(m.cc & (cc::EN | cc::SHN_MASK), 0);
        assert_eq!(m.csts & csts::RDY, 0);
        let mut m = Model::new(u32::MAX);
        assert!(matches!(
            shutdown(&mut m, cc, Duration::from_millis(5)),
            Err(TestError::BringUp(BringUpError::Timeout {
                step: Step::Shutdown,
                ms: 5,
                ..
            }))
        ));
    }
}
