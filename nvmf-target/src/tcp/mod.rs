//! The NVMe/TCP transport (NVMe/TCP Transport Specification 1.0): a
//! connection's PDU state machine, data movement (in-capsule, R2T/H2CData,
//! C2HData) and send queue. Commands it decodes are handed to the
//! controller model (`crate::ctrlr`), which it never second-guesses.

mod conn;
mod sendq;

pub(crate) use conn::{CloseReason, Conn, Ctx};
