//! Input a careless or hostile client sends: the answer is a precise
//! INVALID_ARGUMENT with a short message, whatever the size or shape of what
//! was sent (issue 12, defects 6 and 8).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::{Buf as _, BufMut as _};
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::{ChangePosition, ListOngoingRequest, WatchRequest};
use livemesh_testkit::TestServer;
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// An error message travels in a response header; it must stay this short.
const SHORT: usize = 512;

async fn serve() -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = livemesh_testkit::ongoing_query(dir.path()).await;
    (dir, server)
}

/// `err` is INVALID_ARGUMENT with a message under [`SHORT`] bytes.
fn assert_short_invalid_argument(err: &tonic::Status) {
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.code());
    assert!(
        err.message().len() < SHORT,
        "{} bytes: {}…",
        err.message().len(),
        &err.message()[..200.min(err.message().len())]
    );
}

#[tokio::test]
async fn a_100_kb_page_token_or_watch_token_gets_a_short_invalid_argument() {
    let (_dir, server) = serve().await;
    let mut query = OngoingQueryServiceClient::new(server.channel());
    let huge = "7x".repeat(50_000);

    let err = query
        .list_ongoing(ListOngoingRequest {
            page_size: 10,
            page_token: huge.clone(),
        })
        .await
        .unwrap_err();
    assert_short_invalid_argument(&err);
    assert!(err.message().contains("next_page_token"), "{err:?}");
    assert!(err.message().contains("100000 bytes"), "{err:?}");

    let err = query
        .watch(WatchRequest {
            from: Some(ChangePosition { token: huge }),
        })
        .await
        .unwrap_err();
    assert_short_invalid_argument(&err);
    assert!(err.message().contains("from.token"), "{err:?}");
}

/// Sends its bytes as the message, unchanged, and reads any answer as bytes.
#[derive(Debug, Default, Clone)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

#[tokio::test]
async fn a_body_that_is_not_protobuf_gets_invalid_argument() {
    let (_dir, server) = serve().await;
    let mut grpc = tonic::client::Grpc::new(server.channel());
    // A varint that never ends, then a field with wire type 7 (none such).
    for garbage in [vec![0xff; 11], vec![0x0f, 0x01, 0x02]] {
        grpc.ready().await.unwrap();
        let err = grpc
            .unary(
                tonic::Request::new(garbage.clone()),
                tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/livemesh.v1.OngoingQueryService/GetRoom",
                ),
                RawCodec,
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{garbage:?}: {err:?}");
        assert!(err.message().contains("GetRoomRequest"), "{err:?}");
    }
}
