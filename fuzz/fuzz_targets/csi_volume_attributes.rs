#![no_main]
// A CSI volume's models attribute, as any pod that names the node agent's driver can write
// it: the list is parsed and checked, and every URI in it (or in the error) is shown without
// its query string.
use kube_zerocopy_fetch::config::models_from_json;
use kube_zerocopy_runtime::redact;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    // Whatever follows a `://` up to white space or a quote shows no query.
    let shown = |text: &str| {
        let shown = redact::uris_in(text);
        for (at, _) in shown.match_indices("://") {
            let url = shown[at..]
                .split(|c: char| c.is_whitespace() || matches!(c, '\'' | '"'))
                .next()
                .unwrap_or_default();
            if let Some((_, after)) = url.split_once('?') {
                assert!(after.starts_with("<redacted>"), "{url} shown with its query");
            }
        }
    };
    match models_from_json(json) {
        Ok(models) => {
            for (i, m) in models.iter().enumerate() {
                assert!(models[..i].iter().all(|o| o.name != m.name), "a name twice");
                if let Some(sha) = &m.sha256 {
                    assert_eq!(sha.len(), 64);
                }
                let uri = redact::uri(&m.uri);
                assert!(!uri.contains('#'), "{uri}");
            }
        }
        Err(e) => shown(&format!("{e:#}")),
    }
    shown(json);
});
