//! What every kube-zerocopy binary does around its work, with no part of the store or of
//! libtorch: the operator, the node agent, the weight server and the worker share it.
//!
//! - [`process`]: logs, a one-line error that is also the termination message, exit codes,
//!   SIGTERM, argument parsing, and the health and metrics endpoints.
//! - [`redact`]: URIs shown without their query string and fragment (credentials).

pub mod process;
pub mod redact;
