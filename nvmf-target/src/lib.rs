//! NVMe/TCP target (being written).
