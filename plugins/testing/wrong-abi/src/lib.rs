//! Plugin wrong-abi (placeholder).
