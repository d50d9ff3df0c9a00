//! ram backend (to be written).
