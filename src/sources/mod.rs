//! Where a pipeline's data comes from. Each kind is selected by `source.kind` in the config.

pub mod browser;
pub mod http;
pub mod noop;
