//! Plugin shared-mount (placeholder).
