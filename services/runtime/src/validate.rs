//! Request validation shared by every service: field violations collected in one pass and
//! turned into INVALID_ARGUMENT with a google.rpc.BadRequest detail, so a caller fixes its
//! request in one round trip; and the other structured errors (PreconditionFailure).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use uuid::Uuid;

use crate::{ConsistencyToken, page_token::Cursor};

/// Longest identifier-like value (customer id, SKU, courier id, zone), in characters.
pub const MAX_ID: usize = 64;
/// Longest free text (addresses, reasons, names), in characters.
pub const MAX_TEXT: usize = 512;

/// One offending field of a request: its path (AIP-193 style, `items[2].quantity`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The field path in the request message.
    pub field: String,
    /// What is wrong, for the caller to read.
    pub description: String,
}

/// The violations found in one request.
#[derive(Debug, Default)]
pub struct Violations(Vec<Violation>);

impl Violations {
    /// Records a violation.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(Violation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Whether nothing was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The field paths found so far, in order.
    pub fn fields(&self) -> Vec<&str> {
        self.0.iter().map(|v| v.field.as_str()).collect()
    }

    /// `Ok(value)` when nothing was found, else INVALID_ARGUMENT listing every violation.
    pub fn into_result<T>(self, value: T) -> Result<T, Status> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.into_status())
        }
    }

    /// `Ok(value)` for a value parsed while checking (`Some` whenever its check passed), or
    /// INVALID_ARGUMENT listing every violation.
    pub fn into_parsed<T>(self, value: Option<T>) -> Result<T, Status> {
        match value {
            Some(value) if self.0.is_empty() => Ok(value),
            _ => Err(self.into_status()),
        }
    }

    /// INVALID_ARGUMENT with a google.rpc.BadRequest listing every violation.
    pub fn into_status(self) -> Status {
        let summary = self
            .0
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        let mut details = ErrorDetails::new();
        for violation in self.0 {
            details.add_bad_request_violation(violation.field, violation.description);
        }
        Status::with_error_details(Code::InvalidArgument, summary, details)
    }

    /// Checks an identifier: required, at most [`MAX_ID`] characters of letters, digits,
    /// '-', '_' and '.'.
    pub fn check_id(&mut self, value: &str, field: &str) {
        if value.is_empty() {
            self.add(field, "required");
        } else if value.chars().count() > MAX_ID {
            self.add(field, format!("at most {MAX_ID} characters"));
        } else if !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            self.add(field, "only letters, digits, '-', '_' and '.' are allowed");
        }
    }

    /// Checks an opaque key chosen by callers (a customer id): required, at most [`MAX_ID`]
    /// characters, no control characters.
    pub fn check_key(&mut self, value: &str, field: &str) {
        if value.is_empty() {
            self.add(field, "required");
        } else if value.chars().count() > MAX_ID {
            self.add(field, format!("at most {MAX_ID} characters"));
        } else if value.chars().any(char::is_control) {
            self.add(field, "must not contain control characters");
        }
    }

    /// Checks free text: at most [`MAX_TEXT`] characters, no control characters but newlines
    /// and tabs (Postgres cannot store NUL at all).
    pub fn check_text(&mut self, value: &str, field: &str, required: bool) {
        if required && value.trim().is_empty() {
            self.add(field, "required");
        } else if value.chars().count() > MAX_TEXT {
            self.add(field, format!("at most {MAX_TEXT} characters"));
        } else if value
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t')
        {
            self.add(field, "must not contain control characters");
        }
    }

    /// Parses a required UUID (an order id); `None` after recording why not.
    pub fn uuid(&mut self, value: &str, field: &str) -> Option<Uuid> {
        if value.is_empty() {
            self.add(field, "required");
            return None;
        }
        match Uuid::parse_str(value) {
            Ok(id) => Some(id),
            Err(_) => {
                self.add(field, "must be a UUID");
                None
            }
        }
    }

    /// A consistency token a client sent back: `None` when empty (no read-your-writes asked)
    /// or malformed (recorded as a violation).
    pub fn consistency_token(&mut self, text: &str, field: &str) -> Option<ConsistencyToken> {
        if text.is_empty() {
            return None;
        }
        let token = ConsistencyToken::parse(text);
        if token.is_none() {
            self.add(field, "is not a consistency_token returned by a write");
        }
        token
    }

    /// Where a page starts: `None` for an empty token (the first page), else the cursor's
    /// id, provided the token was issued for `owner`'s listing (a token is not replayable
    /// against another customer's); a foreign or malformed token is a violation.
    pub fn page_cursor(&mut self, token: &str, owner: &str, field: &str) -> Option<Uuid> {
        if token.is_empty() {
            return None;
        }
        match Cursor::decode(token) {
            Some(cursor) if cursor.customer_id == owner => Some(cursor.after),
            Some(_) => {
                self.add(field, "was issued for a different listing");
                None
            }
            None => {
                self.add(field, "is not a page token this service issued");
                None
            }
        }
    }

    /// A page size: 0 means `default`, larger than `max` means `max` (AIP-158), negative is
    /// a violation.
    pub fn page_size(&mut self, value: i32, field: &str, default: i64, max: i64) -> i64 {
        match i64::from(value) {
            size if size < 0 => {
                self.add(field, "must not be negative");
                default
            }
            0 => default,
            size => size.min(max),
        }
    }
}

/// A required UUID field on its own (an order id), or INVALID_ARGUMENT naming it.
pub fn parse_uuid(text: &str, field: &str) -> Result<Uuid, Status> {
    let mut violations = Violations::default();
    let id = violations.uuid(text, field);
    violations.into_parsed(id)
}

/// FAILED_PRECONDITION with a google.rpc.PreconditionFailure detail: `kind` is the
/// precondition type (say "STOCK"), `subject` what failed it (a SKU).
pub fn precondition_failure(kind: &str, subject: &str, description: String) -> Status {
    let mut details = ErrorDetails::new();
    details.add_precondition_failure_violation(kind, subject, description.clone());
    Status::with_error_details(Code::FailedPrecondition, description, details)
}

/// A protobuf timestamp for a database time.
pub fn timestamp(time: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_violation_is_reported_in_order() {
        let mut violations = Violations::default();
        violations.check_id("", "sku");
        violations.check_id("bad sku", "items[1].sku");
        violations.check_text(&"x".repeat(MAX_TEXT + 1), "reason", false);
        violations.check_key("c\0", "customer_id");
        assert_eq!(
            violations.fields(),
            ["sku", "items[1].sku", "reason", "customer_id"]
        );
        let status = violations.into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let fields: Vec<_> = details
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
            .unwrap_or_default();
        assert_eq!(fields, ["sku", "items[1].sku", "reason", "customer_id"]);
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        let mut violations = Violations::default();
        violations.check_key(&"é".repeat(MAX_ID), "customer_id");
        violations.check_text("a\nb\tc", "address", true);
        assert!(violations.is_empty());
    }

    #[test]
    fn page_sizes_default_and_clamp() {
        let mut violations = Violations::default();
        assert_eq!(violations.page_size(0, "page_size", 50, 1000), 50);
        assert_eq!(violations.page_size(5000, "page_size", 50, 1000), 1000);
        assert!(violations.is_empty());
        violations.page_size(-1, "page_size", 50, 1000);
        assert_eq!(violations.fields(), ["page_size"]);
    }
}
