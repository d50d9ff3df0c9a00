//! NVMe/TCP initiator (being written).
