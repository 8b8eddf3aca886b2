//! URIs as they may be shown. A presigned S3 URL or an Azure SAS URL carries its credential in
//! its query string, and a fragment may hold a token too: wherever a URI is written for
//! people (logs, termination messages, conditions, events, the NodeStore), its query and
//! fragment are left out.

use std::borrow::Cow;

/// What stands where a query string or fragment was left out.
const LEFT_OUT: &str = "?<redacted>";

/// `uri` without its query string and fragment.
pub fn uri(uri: &str) -> Cow<'_, str> {
    match uri.find(['?', '#']) {
        Some(at) => Cow::Owned(format!("{}{LEFT_OUT}", &uri[..at])),
        None => Cow::Borrowed(uri),
    }
}

/// `text` with every URL in it shown by [`uri`], whatever its scheme (a mistyped scheme
/// carries its credential as well): a URL starts at its scheme and ends at white space or a
/// quote, less a closing bracket or punctuation that ends the sentence. Anything else may be
/// part of a URL as a user wrote it, so it is left out with the query.
pub fn uris_in(text: &str) -> Cow<'_, str> {
    if !text.contains("://") {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(separator) = rest.find("://") {
        let start = scheme_start(&rest[..separator]);
        shown.push_str(&rest[..start]);
        let url = &rest[start..];
        let end = url
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\''))
            .unwrap_or(url.len());
        // A closing bracket or trailing punctuation belongs to the sentence, not the URL.
        let end = url[..end]
            .trim_end_matches([')', ']', '}', ',', ';', ':', '.'])
            .len()
            .max(separator - start + 3);
        shown.push_str(&uri(&url[..end]));
        rest = &url[end..];
    }
    shown.push_str(rest);
    Cow::Owned(shown)
}

/// Where the scheme that ends `before` begins: the letters, digits, `+`, `-` and `.` just
/// before `://`.
fn scheme_start(before: &str) -> usize {
    before
        .char_indices()
        .rev()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
        .map_or(0, |(at, c)| at + c.len_utf8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_is_shown_without_its_query_or_fragment() {
        assert_eq!(
            uri("https://b.s3.amazonaws.com/m.pt?X-Amz-Signature=abc&X-Amz-Credential=AKIA"),
            "https://b.s3.amazonaws.com/m.pt?<redacted>"
        );
        assert_eq!(
            uri("https://a.blob.core.windows.net/c/m#sig=x"),
            "https://a.blob.core.windows.net/c/m?<redacted>"
        );
        assert_eq!(uri("file:///models/m.pt"), "file:///models/m.pt");
    }

    #[test]
    fn every_url_in_a_message_loses_its_query() {
        let message = "model \"m\" (https://a.blob.core.windows.net/c/m.pt?sv=1&sig=SECRET): \
                       https://a.blob.core.windows.net/c/m.pt?sv=1&sig=SECRET answered HTTP 403, \
                       then \"http://10.0.0.1/x?token=SECRET\".";
        let shown = uris_in(message);
        assert!(!shown.contains("SECRET"), "{shown}");
        assert_eq!(
            shown,
            "model \"m\" (https://a.blob.core.windows.net/c/m.pt?<redacted>): \
             https://a.blob.core.windows.net/c/m.pt?<redacted> answered HTTP 403, \
             then \"http://10.0.0.1/x?<redacted>\"."
        );
        assert!(matches!(uris_in("no url here"), Cow::Borrowed(_)));
        assert_eq!(
            uris_in("unknown scheme in \"htpts://m.example/m.pt?sig=SECRET\""),
            "unknown scheme in \"htpts://m.example/m.pt?<redacted>\""
        );
        assert_eq!(uris_in("odd ://?x"), "odd ://?<redacted>");
        assert_eq!(uris_in("јhttp://h/?t=1"), "јhttp://h/?<redacted>");
        assert_eq!(
            uris_in("(https://h.example/a`b<c>?sig=SECRET)."),
            "(https://h.example/a`b<c>?<redacted>)."
        );
    }
}
