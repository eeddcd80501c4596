//! Bodies the layers keep: a request kept (up to a bound) so it can be sent again, and a
//! unary response read whole so its trailers can be read (retry) or stored (idempotency).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Full};

use tonic::body::Body;

/// The largest unary response read whole (tonic's default decode limit).
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// The outcome of reading a request body for replay.
pub enum Buffered {
    /// The whole body, which can be sent any number of times.
    Complete(Bytes),
    /// Larger than the bound: what was read so far followed by the rest, to be sent once.
    TooLarge(Body),
    /// The body failed while being read.
    Failed(tonic::Status),
}

/// Reads `body` for replay, keeping at most `limit` bytes.
pub async fn buffer_request(mut body: Body, limit: usize) -> Buffered {
    // A unary request is usually one data frame: keep it as it came, and copy only when a
    // second frame arrives.
    let mut first: Option<Bytes> = None;
    let mut joined = BytesMut::new();
    loop {
        match body.frame().await {
            None => {
                return Buffered::Complete(match first {
                    Some(first) => first,
                    None => joined.freeze(),
                });
            }
            Some(Err(status)) => return Buffered::Failed(status),
            Some(Ok(frame)) => {
                // gRPC requests carry no trailers; ignore any rather than fail the call.
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if first.is_none() && joined.is_empty() {
                    first = Some(data);
                } else {
                    if let Some(earlier) = first.take() {
                        joined.extend_from_slice(&earlier);
                    }
                    joined.extend_from_slice(&data);
                }
                let len = first.as_ref().map_or(joined.len(), Bytes::len);
                if len > limit {
                    let prefix = first.take().unwrap_or_else(|| joined.split().freeze());
                    return Buffered::TooLarge(Body::new(Prefixed {
                        prefix: Some(prefix),
                        rest: body,
                    }));
                }
            }
        }
    }
}

/// A body that yields `prefix` and then whatever `rest` yields.
struct Prefixed {
    prefix: Option<Bytes>,
    rest: Body,
}

impl HttpBody for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        if let Some(prefix) = &self.prefix {
            let len = prefix.len() as u64;
            hint.set_lower(hint.lower() + len);
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + len);
            }
        }
        hint
    }
}

/// A replayable request body.
pub fn replay(bytes: &Bytes) -> Body {
    Body::new(Full::new(bytes.clone()))
}

/// A response body read whole, and what its trailers say.
pub struct ReadResponse {
    /// The body again, with the same data and trailers.
    pub body: Body,
    /// The data it carries.
    pub data: Bytes,
    /// The status in its trailers: code, and the whole status (message, details) on demand.
    pub code: Option<tonic::Code>,
    /// `grpc-retry-pushback-ms` from its trailers.
    pub pushback: Option<crate::grpc::Pushback>,
    /// The full status from the trailers, when asked for.
    pub status: Option<tonic::Status>,
}

/// Reads a (unary) response body whole so its trailers can be inspected, up to `limit` bytes.
/// `Err` carries a status for a body that failed or was too large.
///
/// Frames are kept as they came (a unary response is one data frame and the trailers), so
/// nothing is copied unless the message arrived in pieces.
pub async fn read_response(
    mut body: Body,
    limit: usize,
    want_status: bool,
) -> Result<ReadResponse, tonic::Status> {
    let mut chunks: Vec<Bytes> = Vec::with_capacity(1);
    let mut size = 0;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(data) => {
                size += data.len();
                if size > limit {
                    return Err(tonic::Status::resource_exhausted(format!(
                        "response larger than {limit} bytes"
                    )));
                }
                chunks.push(data);
            }
            Err(frame) => {
                if let Ok(map) = frame.into_trailers() {
                    trailers = Some(map);
                }
            }
        }
    }
    let data = match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => chunks.concat().into(),
    };
    let code = trailers.as_ref().and_then(crate::grpc::status_code);
    let pushback = trailers.as_ref().and_then(crate::grpc::pushback);
    let status = want_status
        .then(|| trailers.as_ref().and_then(tonic::Status::from_header_map))
        .flatten();
    Ok(ReadResponse {
        body: Body::new(Replay {
            data: Some(data.clone()).filter(|d| !d.is_empty()),
            trailers,
        }),
        data,
        code,
        pushback,
        status,
    })
}

/// A body that yields its data once, then its trailers.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use http_body_util::StreamBody;

    use super::*;

    /// A body that yields `data` as data frames, one by one.
    fn frames(data: Vec<Bytes>) -> Body {
        let frames = data
            .into_iter()
            .map(|d| Ok::<_, tonic::Status>(Frame::data(d)));
        Body::new(StreamBody::new(tokio_stream::iter(frames)))
    }

    fn body(data: &[&'static str]) -> Body {
        frames(
            data.iter()
                .map(|d| Bytes::from_static(d.as_bytes()))
                .collect(),
        )
    }

    #[tokio::test]
    async fn one_frame_is_kept_as_it_came_and_several_are_joined() {
        let frame = Bytes::from_static(b"hello");
        let one = frames(vec![frame.clone()]);
        let Buffered::Complete(kept) = buffer_request(one, 100).await else {
            panic!("not complete");
        };
        assert_eq!(kept.as_ptr(), frame.as_ptr(), "no copy of a single frame");

        let Buffered::Complete(joined) = buffer_request(body(&["ab", "", "cd", "e"]), 100).await
        else {
            panic!("not complete");
        };
        assert_eq!(&joined[..], b"abcde");
        let Buffered::Complete(empty) = buffer_request(body(&[]), 100).await else {
            panic!("not complete");
        };
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn past_the_limit_the_body_is_sent_once_whole() {
        for frames in [&["abcdef", "gh"][..], &["abc", "def", "gh"][..]] {
            let Buffered::TooLarge(rest) = buffer_request(body(frames), 4).await else {
                panic!("{frames:?}: not too large");
            };
            let all = rest.collect().await.unwrap().to_bytes();
            assert_eq!(&all[..], b"abcdefgh", "{frames:?}");
        }
    }
}
