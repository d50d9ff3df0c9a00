//! file backend (to be written).
