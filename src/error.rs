//! Errors that reach the user, and the exit code each one maps to
//! (docs/interface.md: 1 runtime, 2 usage/config, 3 wrong state).

use thiserror::Error;

/// A failure the CLI reports as one line on stderr with a fixed exit code.
#[derive(Debug, Error)]
pub enum Error {
    /// Bad command line, bad config file or value, devices that do not match.
    #[error("{0}")]
    Config(String),
    /// The command is not valid in the volume's current state.
    #[error("{0}")]
    State(String),
    /// I/O errors, an unreachable server, anything that happened at run time.
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Runtime(_) => 1,
            Error::Config(_) => 2,
            Error::State(_) => 3,
        }
    }
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
    pub fn state(msg: impl Into<String>) -> Self {
        Error::State(msg.into())
    }
    pub fn runtime(msg: impl Into<String>) -> Self {
        Error::Runtime(msg.into())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Runtime(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
