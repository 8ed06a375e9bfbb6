//! The live view: `livemesh top` for any running mesh (a command of the
//! product binary, so the production image has it), and the demo's
//! broadcast on its own process's metrics (crates/lab). Both read the services'
//! Prometheus text (`prom`), turn two samples into the figures of an
//! interval (`figures`) and show them redrawn in place on a terminal or as
//! plain lines (`view`).

pub mod figures;
pub mod prom;
pub mod top;
pub mod view;
