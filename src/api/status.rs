//! The one place a domain `Error` becomes a gRPC `Status`. Storage failures
//! are logged here and answered INTERNAL without their details.

use std::collections::HashMap;

use prost::Message;
use tonic::{Code, Status};

use super::convert;
use crate::domain::Error;

/// The `google.rpc.ErrorInfo` domain of agsync's errors.
pub const ERROR_DOMAIN: &str = "agsync";
const ERROR_INFO_TYPE_URL: &str = "type.googleapis.com/google.rpc.ErrorInfo";
/// The type URL of an `agsync.v1.Document` packed in a `google.protobuf.Any`.
pub const DOCUMENT_TYPE_URL: &str = "type.googleapis.com/agsync.v1.Document";

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let message = e.to_string();
        match e {
            Error::DatabaseNotFound(_) | Error::DocumentNotFound { .. } => {
                Status::not_found(message)
            }
            Error::DatabaseExists(_) => Status::already_exists(message),
            Error::Conflict {
                database,
                id,
                current_rev,
                current,
                ..
            } => {
                let info = tonic_types::pb::ErrorInfo {
                    reason: "CONFLICT".into(),
                    domain: ERROR_DOMAIN.into(),
                    metadata: HashMap::from([
                        ("database".to_owned(), database),
                        ("id".to_owned(), id.into_string()),
                        (
                            "current_rev".to_owned(),
                            current_rev.map(|r| r.to_string()).unwrap_or_default(),
                        ),
                    ]),
                };
                let mut details = vec![prost_types::Any {
                    type_url: ERROR_INFO_TYPE_URL.into(),
                    value: info.encode_to_vec(),
                }];
                match current.map(|doc| convert::document(*doc)) {
                    Some(Ok(doc)) => details.push(prost_types::Any {
                        type_url: DOCUMENT_TYPE_URL.into(),
                        value: doc.encode_to_vec(),
                    }),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, "cannot encode the current document of a conflict")
                    }
                    None => {}
                }
                with_details(Code::Aborted, message, details)
            }
            Error::SinceTooOld { since, oldest } => with_details(
                Code::OutOfRange,
                message,
                vec![error_info(
                    "SINCE_TOO_OLD",
                    [("since", since), ("oldest_seq", oldest)],
                )],
            ),
            Error::SinceAhead { since, head } => with_details(
                Code::OutOfRange,
                message,
                vec![error_info(
                    "SINCE_AHEAD",
                    [("since", since), ("head_seq", head)],
                )],
            ),
            Error::Invalid { .. } => Status::invalid_argument(message),
            Error::RequestIdReused { request_id } => {
                let info = tonic_types::pb::ErrorInfo {
                    reason: "REQUEST_ID_REUSED".into(),
                    domain: ERROR_DOMAIN.into(),
                    metadata: HashMap::from([("request_id".to_owned(), request_id)]),
                };
                let details = vec![prost_types::Any {
                    type_url: ERROR_INFO_TYPE_URL.into(),
                    value: info.encode_to_vec(),
                }];
                with_details(Code::InvalidArgument, message, details)
            }
            Error::TooLarge { .. } | Error::Exhausted(_) => Status::resource_exhausted(message),
            // Retryable: RetryInfo says when (gRPC's standard detail for it).
            Error::SubscribersFull { .. } => with_details(
                Code::ResourceExhausted,
                message,
                vec![
                    error_info::<0>("SUBSCRIBERS_FULL", []),
                    retry_info(SUBSCRIBE_RETRY_DELAY),
                ],
            ),
            Error::StorageFull(_) => with_details(
                Code::ResourceExhausted,
                message,
                vec![error_info::<0>("STORAGE_FULL", [])],
            ),
            Error::Unauthenticated(..) | Error::Revoked(_) => {
                crate::telemetry::count_auth_failure(&e);
                Status::unauthenticated(message)
            }
            Error::PermissionDenied(_) => {
                crate::telemetry::count_auth_failure(&e);
                Status::permission_denied(message)
            }
            Error::Unavailable(_) | Error::Busy(_) => Status::unavailable(message),
            Error::ShuttingDown { since } => with_details(
                Code::Unavailable,
                message,
                vec![error_info("SHUTTING_DOWN", [("since", since)])],
            ),
            Error::SnapshotStalled { since, .. } => with_details(
                Code::Unavailable,
                message,
                vec![error_info("SNAPSHOT_STALLED", [("since", since)])],
            ),
            Error::Config(why) | Error::Fatal(why) => {
                tracing::error!(error = %why, "configuration error reached a client");
                Status::internal("the server is misconfigured; details are in the server log")
            }
            Error::Storage(source) => {
                tracing::error!(error = %source, "storage failure");
                Status::internal(
                    "the server failed to access its storage; the request was not applied, \
                     retry later (details are in the server log)",
                )
            }
        }
    }
}

/// A `google.rpc.ErrorInfo` with numeric metadata, packed in an `Any`.
fn error_info<const N: usize>(reason: &str, metadata: [(&str, u64); N]) -> prost_types::Any {
    let info = tonic_types::pb::ErrorInfo {
        reason: reason.into(),
        domain: ERROR_DOMAIN.into(),
        metadata: metadata
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_string()))
            .collect(),
    };
    prost_types::Any {
        type_url: ERROR_INFO_TYPE_URL.into(),
        value: info.encode_to_vec(),
    }
}

/// A status with `google.rpc.Status` details in `grpc-status-details-bin`.
/// How long a Subscribe refused for --max-subscribers is told to wait.
const SUBSCRIBE_RETRY_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// A `google.rpc.RetryInfo`: retry after `delay`.
fn retry_info(delay: std::time::Duration) -> prost_types::Any {
    let info = tonic_types::pb::RetryInfo {
        retry_delay: Some(prost_types::Duration {
            seconds: i64::try_from(delay.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(delay.subsec_nanos()).unwrap_or(0),
        }),
    };
    prost_types::Any {
        type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
        value: info.encode_to_vec(),
    }
}

fn with_details(code: Code, message: String, details: Vec<prost_types::Any>) -> Status {
    let rich = tonic_types::pb::Status {
        code: code as i32,
        message: message.clone(),
        details,
    };
    Status::with_details(code, message, rich.encode_to_vec().into())
}
