#![no_main]
// An inference request's body as any client of an actor replica can send it: the first byte
// chooses whether a JSON header length is given (the binary extension) and where; the body is
// read into its parts, and JSON data read for its shape, as the replica does before it builds
// a tensor. Nothing may panic, and nothing may be kept beyond the shape's count of values.
#[path = "../../batch/src/protocol/json_data.rs"]
mod json_data;
#[path = "../../batch/src/protocol/request.rs"]
mod request;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    let json_length = (choice & 1 == 1).then(|| usize::from(choice >> 1).min(body.len()));
    let Ok(parsed) = request::parse(body, json_length) else {
        return;
    };
    assert!(!parsed.shape.is_empty());
    assert!(parsed.id.as_ref().is_none_or(|id| id.len() <= body.len()));
    let _ = parsed.binary_output;
    if let request::Data::Bytes(bytes) = &parsed.data {
        assert!(bytes.len() <= body.len());
    }
    let Ok(expected) = request::elements(&parsed.shape) else {
        return;
    };
    if let request::Data::Json(raw) = &parsed.data {
        let what = "input";
        let read = match parsed.datatype.as_str() {
            "BOOL" => json_data::read::<bool>(raw, expected, what, &parsed.datatype).map(|v| v.len()),
            "FP16" | "BF16" | "FP32" | "FP64" => {
                json_data::read::<f64>(raw, expected, what, &parsed.datatype).map(|v| v.len())
            }
            _ => json_data::read::<i64>(raw, expected, what, &parsed.datatype).map(|v| v.len()),
        };
        if let Ok(kept) = read {
            assert_eq!(kept, expected);
        }
    }
});
