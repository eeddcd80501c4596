//! The JSON document as written, and its validation into a [`Policy`].

use std::sync::Arc;

use crate::method::PathMap;

use serde::Deserialize;
use tonic::Code;

use super::{
    BreakerPolicy, BudgetPolicy, FaultPolicy, IdempotencyPolicy, Inner, MethodPolicy, Policy,
    PolicyError, RetryPolicy, ShedPolicy, parse_duration,
};

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    #[serde(default)]
    method_config: Vec<MethodConfig>,
    retry_budget: Option<RetryBudget>,
    breaker: Option<Breaker>,
    load_shedding: Option<LoadShedding>,
    idempotency: Option<Idempotency>,
    deadline_margin: Option<String>,
    max_retry_buffer_bytes: Option<usize>,
    /// gRPC's own fields that do not concern the mesh layer are accepted and ignored.
    #[serde(default, rename = "loadBalancingConfig")]
    _load_balancing_config: Option<serde_json::Value>,
    #[serde(default, rename = "retryThrottling")]
    retry_throttling: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MethodConfig {
    name: Vec<Name>,
    timeout: Option<String>,
    retry_policy: Option<Retry>,
    faults: Option<Faults>,
    #[serde(default, rename = "waitForReady")]
    _wait_for_ready: Option<bool>,
    #[serde(default, rename = "maxRequestMessageBytes")]
    _max_request_message_bytes: Option<serde_json::Value>,
    #[serde(default, rename = "maxResponseMessageBytes")]
    _max_response_message_bytes: Option<serde_json::Value>,
    hedging_policy: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Name {
    service: Option<String>,
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Retry {
    max_attempts: u32,
    initial_backoff: String,
    max_backoff: String,
    backoff_multiplier: f64,
    retryable_status_codes: Vec<CodeName>,
}

/// A status code by name (`"UNAVAILABLE"`) or number (`14`), as the gRPC config allows.
#[derive(Deserialize)]
#[serde(untagged)]
enum CodeName {
    Number(i32),
    Name(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RetryBudget {
    retry_ratio: Option<f32>,
    min_retries_per_second: Option<u32>,
    ttl: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Breaker {
    consecutive_failures: Option<u32>,
    failure_rate: Option<f64>,
    slow_call_rate: Option<f64>,
    slow_call_duration: Option<String>,
    minimum_calls: Option<u32>,
    window: Option<String>,
    base_open: Option<String>,
    max_open: Option<String>,
    half_open_probes: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LoadShedding {
    #[serde(default = "yes")]
    enabled: bool,
    initial_limit: Option<u32>,
    min_limit: Option<u32>,
    max_limit: Option<u32>,
    rtt_tolerance: Option<f64>,
    latency_slack: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Idempotency {
    retention: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Faults {
    abort: Option<Abort>,
    delay: Option<Delay>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Abort {
    code: CodeName,
    percent: f64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Delay {
    duration: String,
    percent: f64,
}

pub(super) fn parse(text: &str) -> Result<Policy, PolicyError> {
    let deserializer = &mut serde_json::Deserializer::from_str(text);
    let document: Document = serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." {
            "policy".to_owned()
        } else {
            path
        };
        PolicyError::new(field, error.into_inner().to_string())
    })?;
    validate(document)
}

fn validate(document: Document) -> Result<Policy, PolicyError> {
    let defaults = Policy::default();
    let defaults = &defaults.inner;
    if document.retry_throttling.is_some() {
        return Err(PolicyError::new(
            "retryThrottling",
            "not supported; use retryBudget (retryRatio, minRetriesPerSecond)",
        ));
    }

    let mut by_method = PathMap::default();
    let mut by_service = PathMap::default();
    let mut default = None;
    for (index, entry) in document.method_config.into_iter().enumerate() {
        let at = format!("methodConfig[{index}]");
        if entry.hedging_policy.is_some() {
            return Err(PolicyError::new(
                format!("{at}.hedgingPolicy"),
                "not supported",
            ));
        }
        if entry.name.is_empty() {
            return Err(PolicyError::new(
                format!("{at}.name"),
                "needs at least one name",
            ));
        }
        let policy = Arc::new(MethodPolicy {
            timeout: entry
                .timeout
                .as_deref()
                .map(|t| positive_duration(t, &format!("{at}.timeout")))
                .transpose()?,
            retry: entry
                .retry_policy
                .map(|r| retry(r, &format!("{at}.retryPolicy")))
                .transpose()?,
            faults: entry
                .faults
                .map(|f| faults(f, &format!("{at}.faults")))
                .transpose()?
                .unwrap_or_default(),
        });
        for (n, name) in entry.name.into_iter().enumerate() {
            let field = format!("{at}.name[{n}]");
            // A path is `/service/method`: a slash inside either could never match a call.
            if [&name.service, &name.method]
                .into_iter()
                .flatten()
                .any(|part| part.contains('/'))
            {
                return Err(PolicyError::new(
                    field,
                    "a service or method name has no '/'",
                ));
            }
            let duplicate = match (name.service, name.method) {
                (None, None) => default.replace(policy.clone()).is_some(),
                (Some(service), None) => by_service.insert(service, policy.clone()).is_some(),
                (Some(service), Some(method)) => by_method
                    .insert(format!("/{service}/{method}"), policy.clone())
                    .is_some(),
                (None, Some(_)) => {
                    return Err(PolicyError::new(field, "a method needs its service"));
                }
            };
            if duplicate {
                return Err(PolicyError::new(field, "this name appears in two entries"));
            }
        }
    }

    let retry_budget = match document.retry_budget {
        None => defaults.retry_budget.clone(),
        Some(b) => {
            let base = &defaults.retry_budget;
            let ratio = b.retry_ratio.unwrap_or(base.retry_ratio);
            if !(0.0..=1000.0).contains(&ratio) {
                return Err(PolicyError::new(
                    "retryBudget.retryRatio",
                    "must be between 0 and 1000",
                ));
            }
            BudgetPolicy {
                retry_ratio: ratio,
                min_per_second: b.min_retries_per_second.unwrap_or(base.min_per_second),
                ttl: optional(b.ttl, "retryBudget.ttl", base.ttl)?,
            }
        }
    };
    if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&retry_budget.ttl) {
        return Err(PolicyError::new(
            "retryBudget.ttl",
            "must be between 1s and 60s",
        ));
    }

    let breaker = match document.breaker {
        None => defaults.breaker.clone(),
        Some(b) => breaker(b, &defaults.breaker)?,
    };
    let load_shedding = match document.load_shedding {
        None => defaults.load_shedding.clone(),
        Some(s) if !s.enabled => None,
        Some(s) => Some(shedding(s)?),
    };
    let idempotency = IdempotencyPolicy {
        retention: optional(
            document.idempotency.and_then(|i| i.retention),
            "idempotency.retention",
            defaults.idempotency.retention,
        )?,
    };
    if idempotency.retention < Duration::from_secs(1) {
        return Err(PolicyError::new(
            "idempotency.retention",
            "must be at least 1s",
        ));
    }
    let deadline_margin = optional(
        document.deadline_margin,
        "deadlineMargin",
        defaults.deadline_margin,
    )?;
    let max_retry_buffer_bytes = document
        .max_retry_buffer_bytes
        .unwrap_or(defaults.max_retry_buffer_bytes);
    if max_retry_buffer_bytes > 16 * 1024 * 1024 {
        return Err(PolicyError::new(
            "maxRetryBufferBytes",
            "must be at most 16 MiB",
        ));
    }

    Ok(Policy {
        inner: Arc::new(Inner {
            by_method,
            by_service,
            default: default.unwrap_or_else(|| Arc::new(MethodPolicy::builtin_default())),
            retry_budget,
            breaker,
            load_shedding,
            idempotency,
            deadline_margin,
            max_retry_buffer_bytes,
        }),
    })
}

use std::time::Duration;

fn duration(text: &str, field: &str) -> Result<Duration, PolicyError> {
    parse_duration(text).map_err(|problem| PolicyError::new(field, problem))
}

fn positive_duration(text: &str, field: &str) -> Result<Duration, PolicyError> {
    let value = duration(text, field)?;
    if value.is_zero() {
        return Err(PolicyError::new(field, "must be greater than zero"));
    }
    Ok(value)
}

fn optional(text: Option<String>, field: &str, default: Duration) -> Result<Duration, PolicyError> {
    text.map(|t| positive_duration(&t, field))
        .transpose()
        .map(|d| d.unwrap_or(default))
}

fn code(name: &CodeName, field: &str) -> Result<Code, PolicyError> {
    let code = match name {
        CodeName::Number(n) if (0..=16).contains(n) => Code::from_i32(*n),
        CodeName::Number(n) => {
            return Err(PolicyError::new(
                field,
                format!("{n} is not a gRPC status code"),
            ));
        }
        CodeName::Name(name) => code_by_name(name).ok_or_else(|| {
            PolicyError::new(field, format!("{name:?} is not a gRPC status code name"))
        })?,
    };
    if code == Code::Ok {
        return Err(PolicyError::new(field, "OK is not a failure"));
    }
    Ok(code)
}

fn code_by_name(name: &str) -> Option<Code> {
    (1..=16)
        .map(Code::from_i32)
        .find(|code| screaming(*code) == name.to_ascii_uppercase())
}

/// `Code::FailedPrecondition` → `FAILED_PRECONDITION`, the name the service config uses.
fn screaming(code: Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn retry(r: Retry, at: &str) -> Result<RetryPolicy, PolicyError> {
    if r.max_attempts < 2 {
        return Err(PolicyError::new(
            format!("{at}.maxAttempts"),
            "must be at least 2 (the first attempt counts)",
        ));
    }
    let initial_backoff = positive_duration(&r.initial_backoff, &format!("{at}.initialBackoff"))?;
    let max_backoff = positive_duration(&r.max_backoff, &format!("{at}.maxBackoff"))?;
    if max_backoff < initial_backoff {
        return Err(PolicyError::new(
            format!("{at}.maxBackoff"),
            "must not be less than initialBackoff",
        ));
    }
    if !(r.backoff_multiplier.is_finite() && r.backoff_multiplier > 0.0) {
        return Err(PolicyError::new(
            format!("{at}.backoffMultiplier"),
            "must be greater than zero",
        ));
    }
    if r.retryable_status_codes.is_empty() {
        return Err(PolicyError::new(
            format!("{at}.retryableStatusCodes"),
            "must name at least one code",
        ));
    }
    let retryable_codes = r
        .retryable_status_codes
        .iter()
        .enumerate()
        .map(|(i, c)| code(c, &format!("{at}.retryableStatusCodes[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(RetryPolicy {
        // gRPC A6: values above 5 are treated as 5.
        max_attempts: r.max_attempts.min(5),
        initial_backoff,
        max_backoff,
        backoff_multiplier: r.backoff_multiplier,
        retryable_codes,
    })
}

fn percent(value: f64, field: String) -> Result<f64, PolicyError> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(PolicyError::new(field, "must be between 0 and 100"))
    }
}

fn faults(f: Faults, at: &str) -> Result<FaultPolicy, PolicyError> {
    Ok(FaultPolicy {
        abort: f
            .abort
            .map(|a| {
                Ok::<_, PolicyError>((
                    code(&a.code, &format!("{at}.abort.code"))?,
                    percent(a.percent, format!("{at}.abort.percent"))?,
                ))
            })
            .transpose()?,
        delay: f
            .delay
            .map(|d| {
                Ok::<_, PolicyError>((
                    positive_duration(&d.duration, &format!("{at}.delay.duration"))?,
                    percent(d.percent, format!("{at}.delay.percent"))?,
                ))
            })
            .transpose()?,
    })
}

fn fraction(value: Option<f64>, default: f64, field: &str) -> Result<f64, PolicyError> {
    let value = value.unwrap_or(default);
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(PolicyError::new(
            field,
            "must be greater than 0 and at most 1",
        ))
    }
}

fn breaker(b: Breaker, base: &BreakerPolicy) -> Result<BreakerPolicy, PolicyError> {
    let policy = BreakerPolicy {
        consecutive_failures: b.consecutive_failures.unwrap_or(base.consecutive_failures),
        failure_rate: fraction(b.failure_rate, base.failure_rate, "breaker.failureRate")?,
        slow_call_rate: fraction(
            b.slow_call_rate,
            base.slow_call_rate,
            "breaker.slowCallRate",
        )?,
        slow_call_duration: optional(
            b.slow_call_duration,
            "breaker.slowCallDuration",
            base.slow_call_duration,
        )?,
        minimum_calls: b.minimum_calls.unwrap_or(base.minimum_calls),
        window: optional(b.window, "breaker.window", base.window)?,
        base_open: optional(b.base_open, "breaker.baseOpen", base.base_open)?,
        max_open: optional(b.max_open, "breaker.maxOpen", base.max_open)?,
        half_open_probes: b.half_open_probes.unwrap_or(base.half_open_probes),
    };
    if policy.consecutive_failures == 0 {
        return Err(PolicyError::new(
            "breaker.consecutiveFailures",
            "must be at least 1",
        ));
    }
    if policy.minimum_calls == 0 {
        return Err(PolicyError::new(
            "breaker.minimumCalls",
            "must be at least 1",
        ));
    }
    if policy.half_open_probes == 0 {
        return Err(PolicyError::new(
            "breaker.halfOpenProbes",
            "must be at least 1",
        ));
    }
    if policy.max_open < policy.base_open {
        return Err(PolicyError::new(
            "breaker.maxOpen",
            "must not be less than baseOpen",
        ));
    }
    Ok(policy)
}

fn shedding(s: LoadShedding) -> Result<ShedPolicy, PolicyError> {
    let base = ShedPolicy::default();
    let policy = ShedPolicy {
        initial_limit: s.initial_limit.unwrap_or(base.initial_limit),
        min_limit: s.min_limit.unwrap_or(base.min_limit),
        max_limit: s.max_limit.unwrap_or(base.max_limit),
        rtt_tolerance: s.rtt_tolerance.unwrap_or(base.rtt_tolerance),
        latency_slack: match s.latency_slack {
            Some(text) => duration(&text, "loadShedding.latencySlack")?,
            None => base.latency_slack,
        },
    };
    if policy.min_limit == 0 {
        return Err(PolicyError::new(
            "loadShedding.minLimit",
            "must be at least 1",
        ));
    }
    if policy.max_limit < policy.min_limit {
        return Err(PolicyError::new(
            "loadShedding.maxLimit",
            "must not be less than minLimit",
        ));
    }
    if !(policy.min_limit..=policy.max_limit).contains(&policy.initial_limit) {
        return Err(PolicyError::new(
            "loadShedding.initialLimit",
            "must be between minLimit and maxLimit",
        ));
    }
    if !(policy.rtt_tolerance.is_finite() && policy.rtt_tolerance >= 1.0) {
        return Err(PolicyError::new(
            "loadShedding.rttTolerance",
            "must be at least 1",
        ));
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn rejected(json: &str) -> String {
        match Policy::from_json(json) {
            Ok(_) => panic!("accepted: {json}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn resolves_method_then_service_then_default() {
        let policy = Policy::from_json(
            r#"{"methodConfig": [
                {"name": [{}], "timeout": "3s"},
                {"name": [{"service": "s.S"}], "timeout": "2s"},
                {"name": [{"service": "s.S", "method": "M"}], "timeout": "1s"}
            ]}"#,
        )
        .unwrap();
        let timeout = |path| policy.method(path).timeout.unwrap();
        assert_eq!(timeout("/s.S/M"), Duration::from_secs(1));
        assert_eq!(timeout("/s.S/Other"), Duration::from_secs(2));
        assert_eq!(timeout("/t.T/M"), Duration::from_secs(3));
    }

    #[test]
    fn reads_a_grpc_service_config_with_codes_by_name_and_number() {
        let policy = Policy::from_json(
            r#"{"methodConfig": [{
                "name": [{"service": "s.S"}],
                "waitForReady": true,
                "retryPolicy": {"maxAttempts": 9, "initialBackoff": "0.1s", "maxBackoff": "1s",
                                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", 8, "resource_exhausted"]}
            }]}"#,
        )
        .unwrap();
        let retry = policy.method("/s.S/M").retry.clone().unwrap();
        assert_eq!(retry.max_attempts, 5, "capped as in gRPC A6");
        assert_eq!(
            retry.retryable_codes,
            [
                Code::Unavailable,
                Code::ResourceExhausted,
                Code::ResourceExhausted
            ]
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases = [
            (
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 1, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"#,
                "methodConfig[0].retryPolicy.maxAttempts",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "timeout": "soon"}]}"#,
                "methodConfig[0].timeout",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "1s", "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["NOPE"]}}]}"#,
                "methodConfig[0].retryPolicy.retryableStatusCodes[0]",
            ),
            (
                r#"{"methodConfig": [{"name": [{"method": "M"}]}]}"#,
                "methodConfig[0].name[0]",
            ),
            (
                r#"{"methodConfig": [{"name": [{"service": "a.S", "method": "b/c"}]}]}"#,
                "methodConfig[0].name[0]",
            ),
            (
                r#"{"breaker": {"failureRate": 1.5}}"#,
                "breaker.failureRate",
            ),
            (
                r#"{"loadShedding": {"minLimit": 10, "maxLimit": 5}}"#,
                "loadShedding.maxLimit",
            ),
            (
                r#"{"methodConfig": [{"name": [{}], "faults": {"abort": {"code": "UNAVAILABLE", "percent": 120}}}]}"#,
                "methodConfig[0].faults.abort.percent",
            ),
            (
                r#"{"retryBudget": {"retryRatio": "lots"}}"#,
                "retryBudget.retryRatio",
            ),
            (r#"{"breakr": {}}"#, "breakr"),
            (
                r#"{"idempotency": {"retention": "0s"}}"#,
                "idempotency.retention",
            ),
        ];
        for (json, field) in cases {
            let message = rejected(json);
            assert!(
                message.starts_with(field),
                "{message:?} should name {field}"
            );
        }
    }
}

#[cfg(test)]
mod readme {
    use super::*;

    /// The policy document shown in the README parses, and its values are the defaults it
    /// claims to be.
    #[test]
    fn the_readme_example_is_valid_and_states_the_defaults() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("## The mesh policy")
            .nth(1)
            .expect("README has a mesh policy section");
        let json = section
            .split("```json")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("the section has a json block");
        let policy = Policy::from_json(json).unwrap();
        let defaults = Policy::default();
        assert_eq!(policy.retry_budget(), defaults.retry_budget());
        assert_eq!(policy.breaker(), defaults.breaker());
        assert_eq!(policy.load_shedding(), defaults.load_shedding());
        assert_eq!(policy.idempotency(), defaults.idempotency());
        assert_eq!(policy.deadline_margin(), defaults.deadline_margin());
        assert_eq!(
            policy.max_retry_buffer_bytes(),
            defaults.max_retry_buffer_bytes()
        );
    }
}
