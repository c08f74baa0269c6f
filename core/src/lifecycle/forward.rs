//! `port add` / `port rm`: change a VM's port forwards. They are the
//! `ports` capability's `forward` option, stored with the VM; on a running
//! VM the capability's PostStart runs again with the new list, which opens
//! or closes just the changed forward (a taken host port fails with the
//! record unchanged). A stopped VM gets them at its next start.

use crate::capability::Hook;
use crate::lifecycle::{Lifecycle, OpError, Progress};
use banger_api::api::{FORWARD_OPTION, PORTS_CAP, PortForward, check_no_clash, forwards_of};
use banger_api::model::{EnabledCap, VmRecord, VmState};

/// What to do to a VM's forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardChange {
    /// Add this forward.
    Add(PortForward),
    /// Remove this forward.
    Remove(PortForward),
}

impl Lifecycle {
    /// Adds or removes one of VM `name`'s port forwards, live when it runs.
    pub async fn change_forward(
        &self,
        name: &str,
        change: ForwardChange,
    ) -> Result<VmRecord, OpError> {
        let (_guard, vm) = self.lock_by_name(name).await?;
        if matches!(vm.state, VmState::Starting | VmState::Stopping) {
            return Err(OpError::WrongState {
                name: name.to_string(),
                state: vm.state,
                hint: "wait for the current operation to finish",
            });
        }
        let invalid = |e: &dyn std::fmt::Display| OpError::Invalid(format!("VM {name}: {e}"));
        let mut forwards = forwards_of(&vm.caps).map_err(|e| invalid(&e))?;
        match change {
            ForwardChange::Add(f) => {
                check_no_clash(&forwards, &f).map_err(|e| invalid(&e))?;
                forwards.push(f);
            }
            ForwardChange::Remove(f) => {
                let Some(i) = forwards.iter().position(|x| *x == f) else {
                    let listed = if forwards.is_empty() {
                        "it has none".to_string()
                    } else {
                        PortForward::join_list(&forwards).replace(',', ", ")
                    };
                    return Err(OpError::Invalid(format!(
                        "VM {name} has no port forward {f} ({listed}); see `banger vm ports {name}`"
                    )));
                };
                forwards.remove(i);
            }
        }
        let mut updated = vm.clone();
        let enabled = set_forwards(&mut updated, &forwards);
        if updated.state == VmState::Running {
            let cap = self
                .registry
                .get(PORTS_CAP)
                .map_err(|e| OpError::Invalid(e.to_string()))?;
            self.run_hook(
                Hook::PostStart,
                &(cap, enabled),
                &updated,
                &Progress::none(),
                (),
                |c, ctx, _| c.post_start(ctx),
            )
            .await?;
            // A VM started without forwards now has some to close at stop.
            if !updated.prepared.iter().any(|p| p == PORTS_CAP) {
                updated.prepared.push(PORTS_CAP.to_string());
            }
        }
        self.save(&mut updated).await?;
        Ok(updated)
    }
}

/// Stores `forwards` as the VM's `ports` options (enabling the capability
/// if it was not) and returns the capability's entry.
fn set_forwards(vm: &mut VmRecord, forwards: &[PortForward]) -> EnabledCap {
    let i = match vm.caps.iter().position(|c| c.name == PORTS_CAP) {
        Some(i) => i,
        None => {
            vm.caps.push(EnabledCap {
                name: PORTS_CAP.to_string(),
                options: Default::default(),
            });
            vm.caps.len() - 1
        }
    };
    let options = &mut vm.caps[i].options;
    if forwards.is_empty() {
        options.remove(FORWARD_OPTION);
    } else {
        options.insert(FORWARD_OPTION.to_string(), PortForward::join_list(forwards));
    }
    vm.caps[i].clone()
}
