//! `wrong-abi`: a test plugin whose root module claims a different banger
//! plugin ABI version than this workspace's, to prove the daemon refuses it.

use banger_plugin_abi::sdk::Plugin;

/// A capability that must never get loaded.
#[derive(Debug, Default)]
pub struct WrongAbi;

impl Plugin for WrongAbi {
    fn name(&self) -> &str {
        "wrong-abi"
    }

    fn description(&self) -> &str {
        "Test plugin built for a future plugin ABI; the daemon must refuse it"
    }
}

banger_plugin_abi::export_plugin!(@with_abi WrongAbi, banger_plugin_abi::ABI_VERSION + 1);
