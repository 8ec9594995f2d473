//! Connection URLs, which may carry a password, and keeping that password out of
//! everything the gate prints: logs, error messages, `check-config`.
//!
//! The `url` crate reads a URL. Where it would read the user information otherwise than its
//! author meant (an unencoded `@`, `/`, `#` or `?` in a password), or cannot read the URL at
//! all, one conservative rule takes over: everything between `://` (or the start) and the
//! last `@` is user information, and all of it is hidden.

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use url::{Position, Url};

use super::ConfigError;

/// A connection URL that may carry a password. It prints (Debug, Display, Serialize) with
/// the password replaced, so it can appear in logs and `check-config` output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The real URL, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

/// A list, from a TOML array or from one comma-separated string (an environment variable).
pub(super) fn list_or_commas<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<SecretUrl>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        One(String),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::Many(items) => items,
        OneOrMany::One(text) => text.split(',').map(str::to_owned).collect(),
    };
    Ok(items
        .into_iter()
        .map(|item| item.trim().to_owned())
        .filter(|item| !item.is_empty())
        .map(SecretUrl)
        .collect())
}

/// Query parameters that carry a password (the Redis client reads `pass` and `password`).
const PASSWORD_PARAMS: [&str; 2] = ["password", "pass"];

/// How a password the gate puts into a URL is percent-encoded: everything but the
/// unreserved characters. `url`'s own userinfo set would leave a `%` as it is, and the
/// client would then decode `%41` in a password to `A`.
const PASSWORD: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Where the user information of `url` lies by the conservative rule: between `://` (or
/// the start, for a string that is not a URL at all) and the last `@`.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://").map_or(0, |i| i + 3);
    let at = url[start..].rfind('@')? + start;
    Some((start, at))
}

/// `url` parsed, when the parser finds the user information the conservative rule finds.
/// They are compared percent-decoded: the parser encodes a second `:` or an `@` of a
/// password, and reads it as meant.
fn parse_as_meant(url: &str) -> Option<Url> {
    let parsed = Url::parse(url).ok()?;
    let written = userinfo_span(url).map_or("", |(start, at)| &url[start..at]);
    let read = match parsed.password() {
        Some(password) => format!("{}:{password}", parsed.username()),
        None => parsed.username().to_owned(),
    };
    let same = percent_decode_str(&read).decode_utf8_lossy()
        == percent_decode_str(written).decode_utf8_lossy();
    same.then_some(parsed)
}

/// The name and value, as written, of a query pair that carries a password, whatever the
/// case or the percent-encoding of its name.
fn password_param(pair: &str) -> Option<(&str, &str)> {
    let (name, value) = pair.split_once('=')?;
    let name_decoded = percent_decode_str(name).decode_utf8_lossy();
    PASSWORD_PARAMS
        .iter()
        .any(|param| name_decoded.eq_ignore_ascii_case(param))
        .then_some((name, value))
}

/// Replaces the password of `scheme://user:password@host/...`, and the value of a
/// `password` or `pass` query parameter, with `***`. A URL the parser would misread loses
/// its whole user information and its whole query instead, so no fragment of a malformed
/// password is ever printed.
pub fn redact_url(url: &str) -> String {
    let Some(mut parsed) = parse_as_meant(url) else {
        let hidden = match userinfo_span(url) {
            Some((start, at)) => format!("{}***{}", &url[..start], &url[at..]),
            None => url.to_owned(),
        };
        return match hidden.split_once('?') {
            Some((before, _)) => format!("{before}?***"),
            None => hidden,
        };
    };
    if let Some(query) = parsed.query() {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match password_param(pair) {
                Some((name, _)) => format!("{name}=***"),
                None => pair.to_owned(),
            })
            .collect();
        parsed.set_query(Some(pairs.join("&").as_str()));
    }
    if parsed.password().is_none() {
        return parsed.into();
    }
    // Cut rather than `set_password`, which refuses a URL with an empty host.
    format!(
        "{}***{}",
        &parsed[..Position::BeforePassword],
        &parsed[Position::AfterPassword..]
    )
}

/// Redacts every URL found in `text` (an error message that quotes a configuration value
/// or a line of the file): each run of characters around a `://` up to a space or quote.
pub fn redact_urls_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let boundary = |c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>');
    while let Some(i) = rest.find("://") {
        let start = rest[..i]
            .char_indices()
            .rev()
            .find(|&(_, c)| boundary(c))
            .map_or(0, |(b, c)| b + c.len_utf8());
        let end = rest[i..].find(boundary).map_or(rest.len(), |e| i + e);
        out.push_str(&rest[..start]);
        out.push_str(&redact_url(&rest[start..end]));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// The secrets of a URL as written: its password and the values of its password
/// parameters. Read by the conservative rule, which takes more as secret, never less; a
/// URL the parser would read otherwise never gets past `check_url_shape` to a client.
fn secrets_of(url: &str) -> impl Iterator<Item = &str> {
    let password = userinfo_span(url)
        .and_then(|(start, at)| url[start..at].split_once(':'))
        .map(|(_, password)| password);
    let params = url
        .split_once('?')
        .into_iter()
        .flat_map(|(_, query)| query.split(['&', '#']))
        .filter_map(password_param)
        .map(|(_, value)| value);
    password
        .into_iter()
        .chain(params)
        .filter(|secret| !secret.is_empty())
}

/// Removes every secret of `urls` from `text` (an error message a client library wrote,
/// which may quote its URL): each password as written and percent-decoded, and any URL
/// left in the text.
pub fn scrub(text: &str, urls: &[&SecretUrl]) -> String {
    let mut out = redact_urls_in(text);
    for secret in urls.iter().flat_map(|url| secrets_of(url.expose())) {
        let decoded = percent_decode_str(secret).decode_utf8_lossy();
        for secret in [secret, &*decoded] {
            out = out.replace(secret, "***");
        }
    }
    out
}

/// Refuses what a URL parser would read differently than its author meant: no `://`, or
/// an unencoded `@ / # ?` in the user name or password. The message never quotes the URL
/// beyond its redacted form.
pub(super) fn check_url_shape(key: &str, url: &SecretUrl) -> Result<(), ConfigError> {
    let text = url.expose();
    if !text.contains("://") {
        return Err(ConfigError(format!(
            "{key} must look like scheme://user:password@host:port/..., and it has no `://`"
        )));
    }
    if let Some((start, at)) = userinfo_span(text)
        && text[start..at].contains(['@', '/', '?', '#'])
    {
        return Err(ConfigError(format!(
            "{key} ({url}) has an unencoded @, /, # or ? in its user name or password; \
             percent-encode them (%40, %2F, %23, %3F)"
        )));
    }
    Ok(())
}

/// `url` with its password replaced by `password` (percent-encoded), keeping the user name;
/// `None` when `url` cannot carry a password (it has no `scheme://host`).
pub(super) fn with_password(url: &str, password: &str) -> Option<String> {
    let mut parsed = Url::parse(url).ok()?;
    let encoded = utf8_percent_encode(password, PASSWORD).to_string();
    parsed.set_password(Some(encoded.as_str())).ok()?;
    Some(parsed.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("redis://user@h"), "redis://user@h");
        assert_eq!(redact_url("amqp://a:b:c@h/v"), "amqp://a:***@h/v");
        let secret = SecretUrl::new("amqp://a:topsecret@h");
        assert!(!format!("{secret:?} {secret}").contains("topsecret"));
    }

    #[test]
    fn a_url_the_parser_cannot_read_loses_its_query_whole() {
        assert_eq!(
            redact_url("redis://h:port/0?password=hunter2"),
            "redis://h:port/0?***"
        );
    }

    /// Passwords with unencoded `@ / # ?`: no fragment of them in any message.
    const TRICKY: [&str; 3] = ["Xq7@Zr9/Wm3", "Yh4#Lc8?Nv6", "Bd2/Fg5@Hk8#Qs1?Tu4"];

    #[test]
    fn a_malformed_password_is_hidden_whole_and_refused_by_name() {
        for password in TRICKY {
            for (key, url) in [
                (
                    "amqp.url",
                    format!("amqp://gate:{password}@rabbit:5672/%2f"),
                ),
                ("redis.url", format!("redis://gate:{password}@redis:6379/0")),
            ] {
                let redacted = redact_url(&url);
                for fragment in password.split(['@', '/', '#', '?']) {
                    assert!(!redacted.contains(fragment), "{redacted} shows {fragment}");
                }
                let toml = format!("[{}]\nurl = {url:?}\n", &key[..key.len() - 4]);
                let err = Config::from_toml_str(&toml).unwrap_err().to_string();
                assert!(err.contains(key) && err.contains("percent-encode"), "{err}");
                for fragment in password.split(['@', '/', '#', '?']) {
                    assert!(!err.contains(fragment), "{err} shows {fragment}");
                }
            }
        }
    }

    #[test]
    fn redaction_never_panics_on_multibyte_text() {
        let text = "x\u{a0}amqp://u:pw@h and \u{3000}redis://:pw2@h \u{2028}";
        let out = redact_urls_in(text);
        assert!(!out.contains("pw"), "{out}");
    }

    #[test]
    fn scrub_removes_a_password_as_written_and_decoded() {
        let url = SecretUrl::new("redis://u:s%40cret%2Fpw@h:6379/0");
        let text = "failed: redis://u:s%40cret%2Fpw@h:6379/0 said s@cret/pw";
        let clean = scrub(text, &[&url]);
        assert!(!clean.contains("cret"), "{clean}");
    }

    #[test]
    fn a_password_from_a_file_is_percent_encoded_whole_percent_signs_included() {
        assert_eq!(
            with_password("redis://u@h:6379/0", "50%41 off").as_deref(),
            Some("redis://u:50%2541%20off@h:6379/0")
        );
        assert_eq!(with_password("redis+unix:///run/redis.sock", "pw"), None);
    }
}
