use tch::Tensor;
use tokio::sync::oneshot;

use super::batcher::Job;
use super::http::{model_route, ModelRoute};

#[test]
fn only_requests_with_rows_of_one_shape_and_datatype_are_merged() {
    let job = |shape: &[i64], kind| Job {
        input: Tensor::zeros(shape, (kind, tch::Device::Cpu)),
        reply: oneshot::channel().0,
    };
    let float = tch::Kind::Float;
    assert!(job(&[2, 4], float).fits_with(&job(&[3, 4], float)));
    assert!(!job(&[2, 4], float).fits_with(&job(&[], float)));
    assert!(!job(&[], float).fits_with(&job(&[2, 4], float)));
    assert!(!job(&[2, 4], float).fits_with(&job(&[2, 5], float)));
    assert!(!job(&[2, 4], float).fits_with(&job(&[2, 4], tch::Kind::Double)));
}

#[test]
fn model_paths_are_routed_with_or_without_a_version() {
    use ModelRoute::*;
    assert_eq!(model_route("net"), Some((Metadata, "net", None)));
    assert_eq!(model_route("net/ready"), Some((Ready, "net", None)));
    assert_eq!(model_route("net/infer"), Some((Infer, "net", None)));
    assert_eq!(
        model_route("net/versions/1/infer"),
        Some((Infer, "net", Some("1")))
    );
    assert_eq!(
        model_route("net/versions/2"),
        Some((Metadata, "net", Some("2")))
    );
    assert_eq!(model_route("a/b/infer"), None);
    assert_eq!(model_route("/infer"), None);
}
