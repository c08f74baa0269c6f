//! A plugin host one ABI minor revision ahead: loads each plugin file given
//! and prints `PATH name=NAME probe=VALUE`, where `probe` is the root
//! module field the next revision adds (`none` for an older plugin, which
//! must read as absent rather than panic).

use abi_stable::library::lib_header_from_path;
use banger_plugin_abi::PluginModuleRef;

fn main() -> std::process::ExitCode {
    let mut ok = true;
    for path in std::env::args_os().skip(1) {
        let path = std::path::PathBuf::from(path);
        let loaded =
            lib_header_from_path(&path).and_then(|h| h.init_root_module::<PluginModuleRef>());
        match loaded {
            Ok(module) => {
                let probe = match module.next_minor_probe() {
                    Some(f) => f().to_string(),
                    None => "none".to_string(),
                };
                let name = match module.new_capability()().into_result() {
                    Ok(cap) => cap.name().into_string(),
                    Err(e) => format!("(failed: {e})"),
                };
                println!("{} name={name} probe={probe}", path.display());
            }
            Err(e) => {
                println!("{} refused: {e}", path.display());
                ok = false;
            }
        }
    }
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
