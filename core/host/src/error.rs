//! How a host operation fails, and the argument checks every operation
//! shares.

/// A privileged operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HostOpsError {
    /// The argument is not acceptable (e.g. a bad interface name).
    #[error("Invalid argument for {op}: {why}")]
    InvalidArgument {
        /// Operation name.
        op: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The operation failed on the host.
    #[error("{op} {target} failed")]
    Failed {
        /// Operation name.
        op: &'static str,
        /// What it acted on.
        target: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Linux interface names: 1-15 bytes, no '/', whitespace or ':'.
pub fn validate_ifname(op: &'static str, name: &str) -> Result<(), HostOpsError> {
    if banger_api::net::is_valid_ifname(name) {
        Ok(())
    } else {
        Err(HostOpsError::InvalidArgument {
            op,
            why: format!("{name:?} is not a valid interface name (1-15 of [A-Za-z0-9._-])"),
        })
    }
}
