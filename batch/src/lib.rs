//! The torch-free half of a batch run: the Task data in a folder or object storage (`data`),
//! a run's shards, records and manifest (`shards`), the inference protocol on the wire
//! (`protocol`), clients' tokens (`client_token`), and a batch run's driver, which sends the
//! shards to an Actor's replicas and commits their answers (`driver`). The libtorch worker runs
//! the models over it; nothing here links libtorch.

pub mod client_token;
pub mod data;
pub mod driver;
pub mod protocol;
pub mod shards;
