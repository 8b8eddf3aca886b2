//! `kube-zerocopy-worker`: maps the pod's published models and runs them (see [`cli`]).
//!
//! [`cli`]: kube_zerocopy_worker::cli

fn main() {
    kube_zerocopy_worker::cli::main()
}
