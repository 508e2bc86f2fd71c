//! The lab's cluster: a hub namespace (bridge + API server), one network and mount namespace
//! per node running a real `meshd agent`, one network namespace per pod. All addresses come from
//! 198.18.0.0/15; nothing is configured in the machine's own namespace.

mod build;
mod checks;
mod processes;
mod state;
mod teardown;

pub use build::*;
pub use checks::*;
pub use processes::*;
pub use state::*;
pub use teardown::*;
