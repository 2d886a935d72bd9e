//! The one error type of the daemon: a message that says what failed and
//! what to do, shown as it is to the user of `nvlibfs mount` and logged.

use std::fmt;

#[derive(Debug)]
pub struct DaemonError(pub(crate) String);

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DaemonError {}

impl DaemonError {
    pub fn new(msg: impl Into<String>) -> DaemonError {
        DaemonError(msg.into())
    }
}
