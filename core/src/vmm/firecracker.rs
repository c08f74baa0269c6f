//! Firecracker backend (placeholder).
