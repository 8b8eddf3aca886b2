//! `kube-zerocopy-python-worker`: the worker's commands (Task shards, the Actor server, local
//! runs), with models that name Python code (`python.entryPoint`) built and run by that code in
//! an interpreter embedded in this process. The weights are mapped read-only by the Python
//! package (`kube_zerocopy`); batches and answers cross as DLPack, without a copy.

mod python;

fn main() {
    kube_zerocopy_worker::model::register_python(Box::new(python::Builder));
    kube_zerocopy_worker::cli::main()
}
