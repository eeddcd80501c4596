//! The bits of the gRPC-over-HTTP/2 wire protocol the layers read and write: `grpc-timeout`,
//! `grpc-status` in headers or trailers, and synthesized error responses.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tonic::{Code, Status, body::Body};

// Header names are constants, not strings: a `&str` name is parsed and validated on every
// lookup, which on the hot path costs more than the lookup.

/// The request header that carries the caller's remaining time.
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// The request header a retrying client sets to the number of earlier attempts (gRPC A6).
pub const PREVIOUS_ATTEMPTS: HeaderName = HeaderName::from_static("grpc-previous-rpc-attempts");
/// The trailer a server sets to tell a client when (or whether) to retry (gRPC A6).
pub const RETRY_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");
/// The metadata key that makes a call idempotent by key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The header or trailer carrying a call's gRPC status code.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// Set on responses that a waybill layer produced instead of the peer, naming the layer
/// (`breaker-open`, `no-endpoints`, `load-shed`, `deadline`, `fault`, `replayed`,
/// `idempotency`), so a caller can tell a
/// local decision from a remote answer.
pub const MESH_MARKER: HeaderName = HeaderName::from_static("waybill-mesh");

/// Parses a `grpc-timeout` value: 1 to 8 ASCII digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?;
    if text.len() < 2 || text.len() > 9 {
        return None;
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.checked_mul(3600)?),
        "M" => Duration::from_secs(amount.checked_mul(60)?),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// Encodes a duration as a `grpc-timeout` value in the finest unit that fits in 8 digits,
/// rounding up so a small positive budget never becomes zero.
pub fn format_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u64 = 99_999_999;
    // u64 arithmetic with constant divisors (multiplications): this runs on every call.
    let Ok(nanos) = u64::try_from(timeout.as_nanos()) else {
        // Past 584 years, which is more than 99,999,999 minutes: hours, rounded up.
        let secs = timeout
            .as_secs()
            .saturating_add(u64::from(timeout.subsec_nanos() > 0));
        return digits(secs.div_ceil(3600).min(MAX), b'H');
    };
    let nanos = nanos.max(1);
    let (amount, unit) = if nanos <= MAX {
        (nanos, b'n')
    } else if nanos.div_ceil(1_000) <= MAX {
        (nanos.div_ceil(1_000), b'u')
    } else if nanos.div_ceil(1_000_000) <= MAX {
        (nanos.div_ceil(1_000_000), b'm')
    } else if nanos.div_ceil(1_000_000_000) <= MAX {
        (nanos.div_ceil(1_000_000_000), b'S')
    } else if nanos.div_ceil(60_000_000_000) <= MAX {
        (nanos.div_ceil(60_000_000_000), b'M')
    } else {
        (nanos.div_ceil(3_600_000_000_000).min(MAX), b'H')
    };
    digits(amount, unit)
}

/// `amount` (at most 8 digits) followed by `unit`, encoded on the stack: no allocation.
fn digits(amount: u64, unit: u8) -> HeaderValue {
    let mut buffer = [0u8; 9];
    let mut start = 8;
    let mut rest = amount;
    loop {
        start -= 1;
        buffer[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    buffer[8] = unit;
    HeaderValue::from_bytes(&buffer[start..]).unwrap_or(HeaderValue::from_static("1n"))
}

/// The `grpc-status` in a header map (a trailers-only response's headers, or trailers).
pub fn status_code(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get(GRPC_STATUS)?.to_str().ok()?;
    value.parse::<i32>().ok().map(Code::from_i32)
}

/// What a server asked of retries through `grpc-retry-pushback-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// Retry no sooner than this.
    After(Duration),
    /// Do not retry (a negative or malformed value).
    Never,
}

/// Reads `grpc-retry-pushback-ms` from headers or trailers.
pub fn pushback(headers: &HeaderMap) -> Option<Pushback> {
    let text = headers.get(RETRY_PUSHBACK)?.to_str().ok()?;
    match text.parse::<i64>() {
        Ok(ms) if ms >= 0 => Some(Pushback::After(Duration::from_millis(ms as u64))),
        _ => Some(Pushback::Never),
    }
}

/// A trailers-only error response carrying `status`, marked as made by the mesh layer
/// `marker`.
pub fn error_response(status: Status, marker: &'static str) -> http::Response<Body> {
    let mut response = status.into_http::<Body>();
    response
        .headers_mut()
        .insert(MESH_MARKER, HeaderValue::from_static(marker));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_trip_and_round_up() {
        for (duration, text) in [
            (Duration::from_nanos(1), "1n"),
            (Duration::from_millis(1500), "1500000u"),
            (Duration::from_secs(5), "5000000u"),
            (Duration::from_secs(500), "500000m"),
            (Duration::from_secs(86_400 * 3), "259200S"),
            (Duration::ZERO, "1n"),
        ] {
            let value = format_timeout(duration);
            assert_eq!(value, text, "{duration:?}");
            assert!(parse_timeout(&value).unwrap_or_default() >= duration);
        }
        assert_eq!(format_timeout(Duration::MAX), "99999999H");
        // Just past u64 nanoseconds, a nanosecond past whole hours: rounded up.
        let odd = Duration::new(5_124_096 * 3600, 1);
        assert_eq!(format_timeout(odd), "5124097H");
        assert_eq!(format_timeout(Duration::from_secs(100 * 60)), "6000000m");
    }

    #[test]
    fn malformed_timeouts_are_rejected() {
        for text in ["", "S", "10", "123456789S", "-1S", "1x", "1.5S"] {
            assert_eq!(
                parse_timeout(&HeaderValue::from_static(text)),
                None,
                "{text}"
            );
        }
        assert_eq!(
            parse_timeout(&HeaderValue::from_static("99999999H")),
            Some(Duration::from_secs(99_999_999 * 3600))
        );
    }

    #[test]
    fn pushback_negative_means_never() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_PUSHBACK, HeaderValue::from_static("250"));
        assert_eq!(
            pushback(&headers),
            Some(Pushback::After(Duration::from_millis(250)))
        );
        headers.insert(RETRY_PUSHBACK, HeaderValue::from_static("-1"));
        assert_eq!(pushback(&headers), Some(Pushback::Never));
    }
}
