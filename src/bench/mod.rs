//! The project's own benchmark commands (`crm-sync bench ...`): they print figures; tests never time.

pub mod pipeline;
pub mod queue;
