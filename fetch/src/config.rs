//! The models one pod serves, as the contract crate defines them (the operator renders them,
//! the weight server, the workers and the node agent read them).

pub use kube_zerocopy_contract::models::*;
