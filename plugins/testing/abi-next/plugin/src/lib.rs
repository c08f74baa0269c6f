//! `next-minor`: a plugin whose root module has one more field than the
//! daemon's (it is built with banger-plugin-abi's `next-minor-test`
//! feature). A daemon of the older minor revision must load it.

use banger_plugin_abi::sdk::Plugin;

/// A capability that does nothing.
#[derive(Debug, Default)]
pub struct NextMinor;

impl Plugin for NextMinor {
    fn name(&self) -> &str {
        "next-minor"
    }

    fn description(&self) -> &str {
        "Test plugin built one plugin ABI minor revision ahead"
    }
}

banger_plugin_abi::export_plugin!(NextMinor);
