//! Plugin faulty (placeholder).
