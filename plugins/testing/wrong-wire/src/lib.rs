//! `wrong-wire`: a test plugin of this plugin ABI whose manifest says it
//! speaks the next wire version (the JSON inside the ABI), to prove the
//! daemon refuses it when it loads it, not at its first hook.

use banger_plugin_abi::sdk::Plugin;

/// A capability that must never get loaded.
#[derive(Debug, Default)]
pub struct WrongWire;

impl Plugin for WrongWire {
    fn name(&self) -> &str {
        "wrong-wire"
    }

    fn description(&self) -> &str {
        "Test plugin speaking a future plugin wire version; the daemon must refuse it"
    }
}

banger_plugin_abi::export_plugin!(@with_wire WrongWire, banger_plugin_abi::wire::WIRE_VERSION + 1);
