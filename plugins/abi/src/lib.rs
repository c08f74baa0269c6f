//! Plugin ABI (placeholder).
