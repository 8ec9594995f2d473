//! The inbound envelope: a borrowing parse of the few fields the gate reads, and their
//! validation. Everything else in the body stays opaque bytes.

use std::borrow::Cow;
use std::fmt;

use serde::Deserializer;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The fields of one valid inbound message, borrowed from its body.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub tenant_id: Cow<'a, str>,
    pub channel: Cow<'a, str>,
    /// The `id` field, when the body has one.
    pub id: Option<Cow<'a, str>>,
    pub channel_metadata: Option<&'a RawValue>,
    pub sender: Option<&'a RawValue>,
    pub thread_id: Option<&'a RawValue>,
    /// The whole body, already known to be valid UTF-8 JSON.
    pub raw: &'a [u8],
}

/// Why a message cannot be read; the code is the `x-gate-error` header's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    TooLarge,
    InvalidJson,
    NotAnObject,
    MissingTenantId,
    InvalidTenantId,
    MissingChannel,
    InvalidChannel,
    InvalidId,
    /// The `x-gate-cost` header is not an integer from 0 to 1,000,000.
    InvalidCost,
    /// Valid, but the broker refused its one output (larger than its `max_message_size`).
    OutputRefused,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::TooLarge,
        ErrorCode::InvalidJson,
        ErrorCode::NotAnObject,
        ErrorCode::MissingTenantId,
        ErrorCode::InvalidTenantId,
        ErrorCode::MissingChannel,
        ErrorCode::InvalidChannel,
        ErrorCode::InvalidId,
        ErrorCode::InvalidCost,
        ErrorCode::OutputRefused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::NotAnObject => "not_an_object",
            ErrorCode::MissingTenantId => "missing_tenant_id",
            ErrorCode::InvalidTenantId => "invalid_tenant_id",
            ErrorCode::MissingChannel => "missing_channel",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::InvalidCost => "invalid_cost",
            ErrorCode::OutputRefused => "output_refused",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message the gate cannot read: its code and one human-readable sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub code: ErrorCode,
    pub detail: String,
}

impl Invalid {
    fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
        }
    }
}

pub const MAX_TENANT_ID_CHARS: usize = 128;
pub const MAX_CHANNEL_CHARS: usize = 32;
pub const MAX_ID_CHARS: usize = 256;

/// `tenant_id`: 1-128 chars of `A-Z a-z 0-9 . _ -`, first char alphanumeric.
pub fn valid_tenant_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TENANT_ID_CHARS
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// `channel`: 1-32 chars of `a-z 0-9 _ -`.
pub fn valid_channel(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_CHANNEL_CHARS
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))
}

/// Parses and validates one body. Bodies over `max_bytes` are refused unread.
pub fn parse(body: &[u8], max_bytes: usize) -> Result<Envelope<'_>, Invalid> {
    if body.len() > max_bytes {
        return Err(Invalid::new(
            ErrorCode::TooLarge,
            format!(
                "The body is {} bytes, over the limit of {max_bytes} bytes.",
                body.len()
            ),
        ));
    }
    // One pass: the JSON parser checks UTF-8 wherever it can occur (inside strings;
    // anywhere else a non-ASCII byte is a syntax error).
    match parse_fields(body) {
        Ok(fields) => validate(fields, body),
        Err(invalid) => match std::str::from_utf8(body) {
            Err(e) => Err(Invalid::new(
                ErrorCode::InvalidJson,
                format!(
                    "The body is not valid UTF-8 (first bad byte at offset {}).",
                    e.valid_up_to()
                ),
            )),
            Ok(_) => Err(invalid),
        },
    }
}

fn invalid_json(e: serde_json::Error) -> Invalid {
    Invalid::new(
        ErrorCode::InvalidJson,
        format!("The body is not valid JSON: {e}."),
    )
}

/// The interesting members of the top-level object, before validation.
#[derive(Default)]
struct Fields<'a> {
    tenant_id: Option<Scalar<'a>>,
    channel: Option<Scalar<'a>>,
    id: Option<Scalar<'a>>,
    channel_metadata: Option<&'a RawValue>,
    sender: Option<&'a RawValue>,
    thread_id: Option<&'a RawValue>,
}

/// A member value reduced to what validation needs: strings stay (borrowed where the JSON
/// has no escapes), anything else only says what it was.
enum Scalar<'a> {
    Null,
    Str(Cow<'a, str>),
    Other(&'static str),
}

fn parse_fields(body: &[u8]) -> Result<Fields<'_>, Invalid> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let parsed = de
        .deserialize_any(TopLevel)
        .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(Some(fields)) => Ok(fields),
        Ok(None) => Err(Invalid::new(
            ErrorCode::NotAnObject,
            "The body is valid JSON but not an object.",
        )),
        Err(e) => Err(duplicate_or_invalid(e)),
    }
}

const DUPLICATE: &str = "duplicate member";

fn duplicate_or_invalid(e: serde_json::Error) -> Invalid {
    let text = e.to_string();
    if text.starts_with(DUPLICATE) {
        // Another reader may take the other copy, so the gate would limit a message the
        // orchestrator attributes elsewhere: refuse the ambiguity.
        let name = text.split('`').nth(1).unwrap_or("?");
        Invalid::new(
            ErrorCode::InvalidJson,
            format!("The member `{name}` appears more than once."),
        )
    } else {
        invalid_json(e)
    }
}

/// Visits the top-level value; `None` when it is valid JSON but not an object.
struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = Option<Fields<'de>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Fields::default();
        while let Some(Name(key)) = map.next_key::<Name<'de>>()? {
            macro_rules! once {
                ($slot:expr, $name:literal) => {{
                    if $slot.is_some() {
                        return Err(de::Error::custom(format!("{DUPLICATE} `{}`", $name)));
                    }
                    $slot = Some(map.next_value()?);
                }};
            }
            match key.as_ref() {
                b"tenant_id" => once!(fields.tenant_id, "tenant_id"),
                b"channel" => once!(fields.channel, "channel"),
                b"id" => once!(fields.id, "id"),
                b"channel_metadata" => once!(fields.channel_metadata, "channel_metadata"),
                b"sender" => once!(fields.sender, "sender"),
                b"thread_id" => once!(fields.thread_id, "thread_id"),
                // Opaque: taken raw, so it need only be grammatical. A decoded string
                // would refuse an escaped lone surrogate (`"\udc00"`), which Python's
                // `json` writes and reads.
                _ => deep_enough(map.next_value::<&RawValue>()?)?,
            }
        }
        for raw in [fields.channel_metadata, fields.sender, fields.thread_id]
            .into_iter()
            .flatten()
        {
            deep_enough(raw)?;
        }
        Ok(Some(fields))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while let Some(raw) = seq.next_element::<&RawValue>()? {
            deep_enough(raw)?;
        }
        Ok(None)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
}

/// serde_json's nesting limit, applied to every part of the body.
const MAX_DEPTH: usize = 128;

/// Raw members are captured without the parser's depth check: it is applied here, counting
/// the top-level object around them, as the parser would. Only arrays and objects nest.
fn deep_enough<E: de::Error>(raw: &RawValue) -> Result<(), E> {
    let text = raw.get();
    if text.starts_with(['[', '{']) && nesting_depth(text) + 1 >= MAX_DEPTH {
        return Err(E::custom("recursion limit exceeded"));
    }
    Ok(())
}

/// The deepest nesting of arrays and objects in valid JSON text.
fn nesting_depth(json: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// A member name, as the bytes it decodes to: a name that holds an escaped lone surrogate
/// is grammatical too (the parser decodes it to bytes, never refusing it).
struct Name<'de>(Cow<'de, [u8]>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_bytes(NameVisitor)
    }
}

struct NameVisitor;

impl<'de> Visitor<'de> for NameVisitor {
    type Value = Name<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a member name")
    }
    fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Self::Value, E> {
        Ok(Name(Cow::Borrowed(v)))
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(Name(Cow::Owned(v.to_vec())))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Name(Cow::Borrowed(v.as_bytes())))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Name(Cow::Owned(v.as_bytes().to_vec())))
    }
}

/// A read member, taken raw (so it need only be grammatical) and then reduced: a string
/// without escapes is borrowed as it is; one whose escapes do not decode to Unicode (a
/// lone surrogate) is "not a valid string", for the field's own rule to refuse.
impl<'de> serde::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = <&'de RawValue>::deserialize(d)?;
        deep_enough(raw)?;
        let text = raw.get();
        Ok(match text.as_bytes().first() {
            Some(b'"') if !text.contains('\\') => {
                Scalar::Str(Cow::Borrowed(&text[1..text.len() - 1]))
            }
            Some(b'"') => match serde_json::from_str::<String>(text) {
                Ok(s) => Scalar::Str(Cow::Owned(s)),
                Err(_) => Scalar::Other("a string that is not valid Unicode"),
            },
            Some(b'n') => Scalar::Null,
            Some(b't' | b'f') => Scalar::Other("a boolean"),
            Some(b'[') => Scalar::Other("an array"),
            Some(b'{') => Scalar::Other("an object"),
            _ => Scalar::Other("a number"),
        })
    }
}

fn validate<'a>(fields: Fields<'a>, raw: &'a [u8]) -> Result<Envelope<'a>, Invalid> {
    let tenant_id = match fields.tenant_id {
        None | Some(Scalar::Null) => {
            return Err(Invalid::new(
                ErrorCode::MissingTenantId,
                "The message has no `tenant_id`.",
            ));
        }
        Some(Scalar::Other(kind)) => {
            return Err(Invalid::new(
                ErrorCode::InvalidTenantId,
                format!("`tenant_id` must be a string, not {kind}."),
            ));
        }
        Some(Scalar::Str(s)) if !valid_tenant_id(&s) => {
            return Err(Invalid::new(
                ErrorCode::InvalidTenantId,
                "`tenant_id` must be 1 to 128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit.",
            ));
        }
        Some(Scalar::Str(s)) => s,
    };
    let channel = match fields.channel {
        None | Some(Scalar::Null) => {
            return Err(Invalid::new(
                ErrorCode::MissingChannel,
                "The message has no `channel`.",
            ));
        }
        Some(Scalar::Other(kind)) => {
            return Err(Invalid::new(
                ErrorCode::InvalidChannel,
                format!("`channel` must be a string, not {kind}."),
            ));
        }
        Some(Scalar::Str(s)) if !valid_channel(&s) => {
            return Err(Invalid::new(
                ErrorCode::InvalidChannel,
                "`channel` must be 1 to 32 characters of a-z 0-9 _ -.",
            ));
        }
        Some(Scalar::Str(s)) => s,
    };
    let id = match fields.id {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Other(kind)) => {
            return Err(Invalid::new(
                ErrorCode::InvalidId,
                format!("`id` must be a string, not {kind}."),
            ));
        }
        Some(Scalar::Str(s)) if s.chars().count() > MAX_ID_CHARS => {
            return Err(Invalid::new(
                ErrorCode::InvalidId,
                "`id` must be at most 256 characters.",
            ));
        }
        Some(Scalar::Str(s)) => Some(s),
    };
    Ok(Envelope {
        tenant_id,
        channel,
        id,
        channel_metadata: fields.channel_metadata,
        sender: fields.sender,
        thread_id: fields.thread_id,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX: usize = 1024 * 1024;

    fn code(body: &[u8]) -> ErrorCode {
        match parse(body, MAX) {
            Ok(_) => panic!("a body of {} bytes was accepted", body.len()),
            Err(invalid) => invalid.code,
        }
    }

    #[test]
    fn a_normal_message_is_read() {
        let body = br#"{"id":"m1","tenant_id":"acme","channel":"slack","text":"hi",
            "sender":{"user_id":"U1"},"channel_metadata":{"team":"T"},"thread_id":"t-9"}"#;
        let env = parse(body, MAX).unwrap();
        assert_eq!(env.tenant_id, "acme");
        assert_eq!(env.channel, "slack");
        assert_eq!(env.id.as_deref(), Some("m1"));
        assert_eq!(env.sender.unwrap().get(), r#"{"user_id":"U1"}"#);
        assert_eq!(env.channel_metadata.unwrap().get(), r#"{"team":"T"}"#);
        assert_eq!(env.thread_id.unwrap().get(), r#""t-9""#);
        assert!(matches!(env.tenant_id, Cow::Borrowed(_)));
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let env = parse(br#"{"tenant\u005fid":"ac\u006de","channel":"slack"}"#, MAX).unwrap();
        assert_eq!(env.tenant_id, "acme");
    }

    #[test]
    fn every_error_code() {
        assert_eq!(parse(b"{}", 1).unwrap_err().code, ErrorCode::TooLarge);
        assert_eq!(code(b"{\"tenant_id\":"), ErrorCode::InvalidJson);
        assert_eq!(code(b"\xff\xfe{}"), ErrorCode::InvalidJson);
        let bad_utf8_in_a_string = b"{\"tenant_id\":\"a\xff\",\"channel\":\"b\"}";
        let invalid = parse(bad_utf8_in_a_string, MAX).unwrap_err();
        assert_eq!(invalid.code, ErrorCode::InvalidJson);
        assert!(invalid.detail.contains("UTF-8"), "{}", invalid.detail);
        let bad_utf8_in_an_opaque_member =
            b"{\"tenant_id\":\"a\",\"channel\":\"b\",\"x\":\"\xc3\"}";
        assert_eq!(code(bad_utf8_in_an_opaque_member), ErrorCode::InvalidJson);
        assert_eq!(code(b""), ErrorCode::InvalidJson);
        assert_eq!(code(b"{} {}"), ErrorCode::InvalidJson);
        assert_eq!(code(b"[1,2]"), ErrorCode::NotAnObject);
        assert_eq!(code(b"\"text\""), ErrorCode::NotAnObject);
        assert_eq!(code(b"null"), ErrorCode::NotAnObject);
        assert_eq!(code(br#"{"channel":"slack"}"#), ErrorCode::MissingTenantId);
        assert_eq!(
            code(br#"{"tenant_id":null,"channel":"slack"}"#),
            ErrorCode::MissingTenantId
        );
        assert_eq!(
            code(br#"{"tenant_id":7,"channel":"slack"}"#),
            ErrorCode::InvalidTenantId
        );
        assert_eq!(
            code(br#"{"tenant_id":"","channel":"slack"}"#),
            ErrorCode::InvalidTenantId
        );
        assert_eq!(
            code(br#"{"tenant_id":"-acme","channel":"slack"}"#),
            ErrorCode::InvalidTenantId
        );
        assert_eq!(
            code(br#"{"tenant_id":"ac me","channel":"slack"}"#),
            ErrorCode::InvalidTenantId
        );
        let long_tenant = format!(r#"{{"tenant_id":"{}","channel":"slack"}}"#, "a".repeat(129));
        assert_eq!(code(long_tenant.as_bytes()), ErrorCode::InvalidTenantId);
        assert_eq!(code(br#"{"tenant_id":"acme"}"#), ErrorCode::MissingChannel);
        assert_eq!(
            code(br#"{"tenant_id":"acme","channel":null}"#),
            ErrorCode::MissingChannel
        );
        assert_eq!(
            code(br#"{"tenant_id":"acme","channel":"Slack"}"#),
            ErrorCode::InvalidChannel
        );
        assert_eq!(
            code(br#"{"tenant_id":"acme","channel":["slack"]}"#),
            ErrorCode::InvalidChannel
        );
        let long_channel = format!(r#"{{"tenant_id":"a","channel":"{}"}}"#, "c".repeat(33));
        assert_eq!(code(long_channel.as_bytes()), ErrorCode::InvalidChannel);
        assert_eq!(
            code(br#"{"tenant_id":"acme","channel":"slack","id":5}"#),
            ErrorCode::InvalidId
        );
        let long_id = format!(
            r#"{{"tenant_id":"a","channel":"slack","id":"{}"}}"#,
            "i".repeat(257)
        );
        assert_eq!(code(long_id.as_bytes()), ErrorCode::InvalidId);
    }

    #[test]
    fn limits_are_inclusive() {
        let body = format!(
            r#"{{"tenant_id":"{}","channel":"{}","id":"{}"}}"#,
            "t".repeat(128),
            "c".repeat(32),
            "é".repeat(256)
        );
        assert!(parse(body.as_bytes(), MAX).is_ok());
        assert!(parse(body.as_bytes(), body.len()).is_ok());
        assert_eq!(
            parse(body.as_bytes(), body.len() - 1).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn null_id_is_absent() {
        let env = parse(br#"{"tenant_id":"a","channel":"b","id":null}"#, MAX).unwrap();
        assert!(env.id.is_none());
    }

    #[test]
    fn duplicate_read_members_are_invalid_json() {
        let invalid =
            parse(br#"{"tenant_id":"a","channel":"b","tenant_id":"c"}"#, MAX).unwrap_err();
        assert_eq!(invalid.code, ErrorCode::InvalidJson);
        assert!(invalid.detail.contains("tenant_id"), "{}", invalid.detail);
        // Opaque members may repeat: the gate never reads them.
        assert!(parse(br#"{"tenant_id":"a","channel":"b","x":1,"x":2}"#, MAX).is_ok());
    }

    #[test]
    fn an_escaped_lone_surrogate_in_an_opaque_member_is_grammatical() {
        // What Python's json.dumps writes for a lone surrogate, in content and in a
        // member the gate reads raw.
        let body = br#"{"tenant_id":"a","channel":"b","content":{"text":"\udc00 \ud800x"},"sender":{"display_name":"\udfff"}}"#;
        assert!(parse(body, MAX).is_ok());
        // Not grammatical is still refused.
        assert_eq!(
            code(br#"{"tenant_id":"a","channel":"b","content":"\uZZZZ"}"#),
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn an_escaped_lone_surrogate_is_grammatical_in_names_arrays_and_read_members() {
        // In a member name, and in a top-level array: grammatical JSON.
        let body = br#"{"tenant_id":"a","channel":"b","\udc00":1,"x\ud800":[{"\udfff":"\udc00"}]}"#;
        assert!(parse(body, MAX).is_ok());
        assert_eq!(code(br#"["\udc00",{"\ud800":1}]"#), ErrorCode::NotAnObject);
        // In a member the gate reads: the field's own rule refuses it.
        assert_eq!(
            code(br#"{"tenant_id":"\udc00","channel":"b"}"#),
            ErrorCode::InvalidTenantId
        );
        assert_eq!(
            code(br#"{"tenant_id":"a","channel":"\ud800"}"#),
            ErrorCode::InvalidChannel
        );
        assert_eq!(
            code(br#"{"tenant_id":"a","channel":"b","id":"m\udc00"}"#),
            ErrorCode::InvalidId
        );
        // Escapes that decode are read as before; a read name still counts once.
        let envelope = parse(br#"{"tenant_\u0069d":"a\u002eb","channel":"c"}"#, MAX).unwrap();
        assert_eq!(envelope.tenant_id, "a.b");
        assert_eq!(
            code(br#"{"tenant_id":"a","tenant_\u0069d":"b","channel":"c"}"#),
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn deep_nesting_is_invalid_json_not_a_crash() {
        let depth = 200_000;
        let mut body = String::from(r#"{"tenant_id":"a","channel":"b","deep":"#);
        body.push_str(&"[".repeat(depth));
        body.push_str(&"]".repeat(depth));
        body.push('}');
        assert_eq!(code(body.as_bytes()), ErrorCode::InvalidJson);
        let mut top = "[".repeat(depth);
        top.push_str(&"]".repeat(depth));
        assert_eq!(code(top.as_bytes()), ErrorCode::InvalidJson);
        let mut inside_a_read_member = String::from(r#"{"tenant_id":"a","channel":"b","sender":"#);
        inside_a_read_member.push_str(&"{\"k\":".repeat(20_000));
        inside_a_read_member.push('1');
        inside_a_read_member.push_str(&"}".repeat(20_001));
        assert_eq!(
            code(inside_a_read_member.as_bytes()),
            ErrorCode::InvalidJson
        );
        // Reasonable nesting is fine.
        let mut fine = String::from(r#"{"tenant_id":"a","channel":"b","deep":"#);
        fine.push_str(&"[".repeat(100));
        fine.push_str(&"]".repeat(100));
        fine.push('}');
        assert!(parse(fine.as_bytes(), MAX).is_ok());
        // The parser's own limit, to the level, in opaque and read members alike: 127
        // levels in all pass, 128 do not.
        for member in ["deep", "sender"] {
            let nested = |levels: usize| {
                let mut body = format!(r#"{{"tenant_id":"a","channel":"b","{member}":"#);
                body.push_str(&"[".repeat(levels));
                body.push_str(&"]".repeat(levels));
                body.push('}');
                body
            };
            assert!(parse(nested(126).as_bytes(), MAX).is_ok(), "{member}");
            assert_eq!(
                code(nested(127).as_bytes()),
                ErrorCode::InvalidJson,
                "{member}"
            );
        }
    }

    #[test]
    fn nesting_depth_ignores_brackets_in_strings() {
        assert_eq!(nesting_depth(r#"{"a":"[[[{{\"]]","b":[[1]]}"#), 3);
        assert_eq!(nesting_depth("1"), 0);
    }

    #[test]
    fn every_code_has_a_distinct_name() {
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,20}".prop_map(serde_json::Value::from),
            "[a-z0-9_-]{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(6, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("tenant_id".to_string()),
                        Just("channel".to_string()),
                        Just("id".to_string()),
                        Just("sender".to_string()),
                        ".{0,8}".prop_map(String::from),
                    ],
                    inner,
                    0..8
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&body, MAX);
        }

        #[test]
        fn arbitrary_json_never_panics_and_agrees_with_serde(value in arb_json()) {
            let body = serde_json::to_vec(&value).unwrap();
            match parse(&body, MAX) {
                Ok(env) => {
                    let obj = value.as_object().unwrap();
                    prop_assert_eq!(obj["tenant_id"].as_str().unwrap(), env.tenant_id.as_ref());
                    prop_assert_eq!(obj["channel"].as_str().unwrap(), env.channel.as_ref());
                }
                Err(invalid) => {
                    let expected = match value.as_object() {
                        None => ErrorCode::NotAnObject,
                        Some(obj) => match (obj.get("tenant_id"), obj.get("channel"), obj.get("id")) {
                            (None | Some(serde_json::Value::Null), _, _) => ErrorCode::MissingTenantId,
                            (Some(t), _, _) if !t.as_str().is_some_and(valid_tenant_id) => ErrorCode::InvalidTenantId,
                            (_, None | Some(serde_json::Value::Null), _) => ErrorCode::MissingChannel,
                            (_, Some(c), _) if !c.as_str().is_some_and(valid_channel) => ErrorCode::InvalidChannel,
                            _ => ErrorCode::InvalidId,
                        },
                    };
                    prop_assert_eq!(invalid.code, expected);
                }
            }
        }

        #[test]
        fn valid_envelopes_round_trip(
            tenant in "[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
            channel in "[a-z0-9_-]{1,32}",
        ) {
            let body = serde_json::json!({"tenant_id": tenant, "channel": channel, "x": [1, {"y": null}]});
            let body = serde_json::to_vec(&body).unwrap();
            let env = parse(&body, MAX).unwrap();
            prop_assert_eq!(env.tenant_id.as_ref(), tenant.as_str());
            prop_assert_eq!(env.channel.as_ref(), channel.as_str());
        }
    }
}
