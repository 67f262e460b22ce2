//! The one query-string parser of the front end: the endpoints and the failure log use
//! it.

/// The (URL-decoded) value of query parameter `name`, if present.
pub fn query_param(uri: &hyper::Uri, name: &str) -> Option<String> {
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}
