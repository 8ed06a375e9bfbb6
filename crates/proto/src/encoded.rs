//! `Subscribe`'s responses written from pre-encoded bytes.
//!
//! A subscribe node encodes each room event once, when it arrives, and every
//! stream of the room writes those bytes: prost is not run per stream. The
//! wire format is the contract's (`SubscribeResponse`); a client decodes it
//! with its generated types as before.
//!
//! - An **ordered** event is the same for every stream: it is kept as the
//!   encoding of `SubscribeResponse { event }` ([`Ordered`]). Since
//!   `SubscribeResponse.event` and `EventBatch.events` are both field 1 of
//!   type `RoomEvent`, those bytes are also one element of a batch.
//! - A **latest-value** event carries the position of the last ordered event
//!   the stream was sent, which differs per stream. Its shared bytes are the
//!   `RoomEvent` without `epoch` and `offset` ([`Latest`]); each stream
//!   appends its own `epoch` and `offset` fields after them, inside the same
//!   length-delimited `RoomEvent` (a few bytes). Protobuf parsers take fields
//!   in any order, so the message decodes to the event with that position.
//! - A **batch** (`SubscribeResponse { batch }`) is its tag and length, then
//!   the elements above, copied from the shared bytes ([`BatchWriter`]).
//!
//! - A frame of a stream that asked for `stamp_writes` ([`Frame::stamped`])
//!   gets `SubscribeResponse.written_at` appended when the encoder writes it:
//!   a top-level field after the message's other fields, read with the
//!   clock at that moment. Unstamped frames are written as before.
//!
//! The request side stays prost, with [`LeanCodec`]'s decoder.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};

use crate::codec::LeanCodec;
use crate::v1::{RoomEvent, SubscribeRequest, SubscribeResponse};

/// `SubscribeResponse.event` and `EventBatch.events`.
const EVENT_FIELD: u32 = 1;
/// `SubscribeResponse.batch`.
const BATCH_FIELD: u32 = 3;
/// `SubscribeResponse.written_at`.
const WRITTEN_AT_FIELD: u32 = 4;
/// The most `written_at` takes: tag, length, and a `Timestamp` (two fields
/// of at most 11 bytes each).
const STAMP_BYTES: usize = 2 + 22;
/// `RoomEvent.epoch` and `RoomEvent.offset`.
const EPOCH_FIELD: u32 = 2;
const OFFSET_FIELD: u32 = 3;

/// Initial size of each stream's encode buffer. Most streams are idle and
/// hold theirs for as long as they live; a room event is ~70 bytes.
const BUFFER_BYTES: usize = 256;
/// Encoded messages are handed to the transport once this many bytes wait.
const YIELD_BYTES: usize = 32 * 1024;

/// A position's fields as a latest-value event carries them: at most two
/// tags and two 10-byte varints.
#[derive(Debug, Clone, Copy)]
struct PositionFields {
    bytes: [u8; 22],
    len: u8,
}

impl PositionFields {
    fn new((epoch, offset): (u64, u64)) -> Self {
        let mut bytes = [0u8; 22];
        let mut out = &mut bytes[..];
        // proto3 leaves zeros out, as prost would.
        if epoch != 0 {
            encode_key(EPOCH_FIELD, WireType::Varint, &mut out);
            encode_varint(epoch, &mut out);
        }
        if offset != 0 {
            encode_key(OFFSET_FIELD, WireType::Varint, &mut out);
            encode_varint(offset, &mut out);
        }
        let len = 22 - out.len();
        Self {
            bytes,
            // At most 22.
            len: len as u8,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// An ordered event encoded once: `SubscribeResponse { event }`.
#[derive(Debug, Clone)]
pub struct Ordered {
    bytes: Bytes,
}

impl Ordered {
    pub fn new(event: &RoomEvent) -> Self {
        let len = event.encoded_len();
        let mut buf = BytesMut::with_capacity(1 + encoded_len_varint(len as u64) + len);
        prost::encoding::message::encode(EVENT_FIELD, event, &mut buf);
        Self {
            bytes: buf.freeze(),
        }
    }

    /// The encoded length as one element of a batch (the same bytes).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The message that carries this event alone. A small one is copied
    /// into the frame: every stream of a hot room cloning (and dropping)
    /// the same `Bytes` made its reference count the hottest cache line of
    /// a fan-out.
    pub fn frame(&self) -> Frame {
        match Inline::copy(&self.bytes) {
            Some(inline) => Frame::of(Inner::Inline(inline)),
            None => Frame::of(Inner::Whole(self.bytes.clone())),
        }
    }
}

/// A latest-value event encoded once, without its position.
#[derive(Debug, Clone)]
pub struct Latest {
    body: Bytes,
}

impl Latest {
    /// `event` with its `epoch` and `offset` left out (each stream adds its own).
    pub fn new(event: &RoomEvent) -> Self {
        let shared = RoomEvent {
            epoch: 0,
            offset: 0,
            ..event.clone()
        };
        Self {
            body: shared.encode_to_vec().into(),
        }
    }

    /// This event with `position` as one element of a batch, or as the
    /// body of `SubscribeResponse { event }` (the same bytes).
    fn write_element(&self, position: PositionFields, dst: &mut impl BufMut) {
        let len = self.body.len() + position.as_slice().len();
        encode_key(EVENT_FIELD, WireType::LengthDelimited, dst);
        encode_varint(len as u64, dst);
        dst.put_slice(&self.body);
        dst.put_slice(position.as_slice());
    }

    fn element_len(&self, position: PositionFields) -> usize {
        let len = self.body.len() + position.as_slice().len();
        1 + encoded_len_varint(len as u64) + len
    }

    /// The message that carries this event alone, at `position`.
    pub fn frame(&self, position: (u64, u64)) -> Frame {
        let position = PositionFields::new(position);
        let len = self.element_len(position);
        if len <= INLINE_BYTES {
            let mut inline = Inline {
                bytes: [0; INLINE_BYTES],
                len: 0,
            };
            let mut out = &mut inline.bytes[..];
            self.write_element(position, &mut out);
            inline.len = len as u8;
            return Frame::of(Inner::Inline(inline));
        }
        Frame::of(Inner::Latest {
            body: self.clone(),
            position,
        })
    }
}

/// Builds one `SubscribeResponse { batch }` from shared bytes.
///
/// The elements are copied into a buffer that leaves room in front for the
/// batch's tag and length, which are known only at the end.
#[derive(Debug)]
pub struct BatchWriter {
    buf: BytesMut,
    events: usize,
}

/// Room for the batch's tag (1 byte) and length (up to 5 bytes: < 4 GiB).
const BATCH_HEAD: usize = 6;

impl BatchWriter {
    pub fn new() -> Self {
        let mut buf = BytesMut::with_capacity(256);
        buf.put_slice(&[0u8; BATCH_HEAD]);
        Self { buf, events: 0 }
    }

    /// Bytes of the elements so far.
    pub fn len(&self) -> usize {
        self.buf.len() - BATCH_HEAD
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    pub fn push_ordered(&mut self, event: &Ordered) {
        self.buf.put_slice(&event.bytes);
        self.events += 1;
    }

    pub fn push_latest(&mut self, event: &Latest, position: (u64, u64)) {
        let position = PositionFields::new(position);
        self.buf.reserve(event.element_len(position));
        event.write_element(position, &mut self.buf);
        self.events += 1;
    }

    /// The message; `None` if no event was added.
    pub fn finish(self) -> Option<Frame> {
        if self.events == 0 {
            return None;
        }
        let Self { mut buf, .. } = self;
        let len = (buf.len() - BATCH_HEAD) as u64;
        let head_len = 1 + encoded_len_varint(len);
        let start = BATCH_HEAD - head_len;
        let mut head = &mut buf[start..BATCH_HEAD];
        encode_key(BATCH_FIELD, WireType::LengthDelimited, &mut head);
        encode_varint(len, &mut head);
        Some(Frame::of(Inner::Whole(buf.freeze().slice(start..))))
    }
}

impl Default for BatchWriter {
    fn default() -> Self {
        Self::new()
    }
}

/// One `SubscribeResponse` on the wire, from pre-encoded parts.
#[derive(Debug, Clone)]
pub struct Frame {
    body: Inner,
    /// Append `written_at` when written.
    stamped: bool,
}

/// Frames up to this size are copied rather than shared. 118 keeps a
/// [`Frame`] (these bytes, their length, the variant's tag and the stamp
/// flag) at 128 bytes, two cache lines.
const INLINE_BYTES: usize = 118;

/// A small message held in the frame itself.
#[derive(Debug, Clone, Copy)]
struct Inline {
    bytes: [u8; INLINE_BYTES],
    len: u8,
}

impl Inline {
    fn copy(bytes: &[u8]) -> Option<Self> {
        let len = bytes.len();
        if len > INLINE_BYTES {
            return None;
        }
        let mut inline = Self {
            bytes: [0; INLINE_BYTES],
            len: len as u8,
        };
        inline.bytes[..len].copy_from_slice(bytes);
        Some(inline)
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

#[derive(Debug, Clone)]
enum Inner {
    /// A whole encoded message.
    Whole(Bytes),
    /// A small whole message, copied.
    Inline(Inline),
    /// `SubscribeResponse { event }` of a latest value at a stream's position.
    Latest {
        body: Latest,
        position: PositionFields,
    },
}

impl Frame {
    fn of(body: Inner) -> Self {
        Self {
            body,
            stamped: false,
        }
    }

    /// A message encoded with prost (a stream's start, replayed events).
    pub fn message(message: &SubscribeResponse) -> Self {
        Self::of(Inner::Whole(message.encode_to_vec().into()))
    }

    /// This frame with `written_at` set to the time it is written (for a
    /// stream that asked for `stamp_writes`).
    #[must_use]
    pub fn stamped(self) -> Self {
        Self {
            stamped: true,
            ..self
        }
    }

    /// The length of the message without its write stamp (exact for an
    /// unstamped frame; a stamp adds at most a few dozen bytes).
    pub fn encoded_len(&self) -> usize {
        match &self.body {
            Inner::Whole(bytes) => bytes.len(),
            Inner::Inline(inline) => inline.as_slice().len(),
            Inner::Latest { body, position } => body.element_len(*position),
        }
    }

    /// Writes the message, and its stamp (the clock read now) if stamped.
    fn write(&self, dst: &mut impl BufMut) {
        match &self.body {
            Inner::Whole(bytes) => dst.put_slice(bytes),
            Inner::Inline(inline) => dst.put_slice(inline.as_slice()),
            Inner::Latest { body, position } => body.write_element(*position, dst),
        }
        if self.stamped {
            let now = prost_types::Timestamp::from(std::time::SystemTime::now());
            prost::encoding::message::encode(WRITTEN_AT_FIELD, &now, dst);
        }
    }

    /// At most how many bytes [`Self::write`] writes.
    fn max_len(&self) -> usize {
        self.encoded_len() + if self.stamped { STAMP_BYTES } else { 0 }
    }

    /// The bytes of this message (what the encoder writes, stamped now if
    /// stamped).
    pub fn to_bytes(&self) -> Bytes {
        match &self.body {
            Inner::Whole(bytes) if !self.stamped => bytes.clone(),
            _ => {
                let mut buf = BytesMut::with_capacity(self.max_len());
                self.write(&mut buf);
                buf.freeze()
            }
        }
    }
}

/// The encoder of [`FrameCodec`]: copies a frame's bytes.
#[derive(Debug, Default)]
pub struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = Status;

    fn encode(&mut self, item: Frame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.max_len());
        item.write(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
    }
}

/// The codec `Subscribe` is served with: [`Frame`]s out, and requests
/// decoded exactly as every other call's (prost, [`LeanCodec`]'s decoder,
/// so a malformed request gets the same status).
#[derive(Debug, Default)]
pub struct FrameCodec;

type RequestCodec = LeanCodec<SubscribeResponse, SubscribeRequest>;

impl Codec for FrameCodec {
    type Encode = Frame;
    type Decode = SubscribeRequest;
    type Encoder = FrameEncoder;
    type Decoder = <RequestCodec as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestCodec::default().decoder()
    }
}

/// The generated `SubscribeService` server whose `Subscribe` streams
/// [`Frame`]s (see `build.rs`). Clients use `crate::v1`'s client as before.
pub mod server {
    #![allow(missing_docs, unused_qualifications, clippy::all, clippy::pedantic)]
    include!(concat!(
        env!("OUT_DIR"),
        "/encoded/livemesh.v1.SubscribeService.rs"
    ));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::v1::{Comment, EventBatch, LoveTotal, ViewerCount, room_event, subscribe_response};

    fn comment(offset: u64, text: &str) -> RoomEvent {
        RoomEvent {
            room_id: 42,
            epoch: 1_700_000_000_123,
            offset,
            server_time: Some(crate::time::timestamp_from_ms(1_700_000_000_456)),
            kind: Some(room_event::Kind::Comment(Comment {
                viewer_id: 9,
                text: text.into(),
            })),
        }
    }

    fn total(total: u64) -> RoomEvent {
        RoomEvent {
            room_id: 42,
            epoch: 0,
            offset: 0,
            server_time: Some(crate::time::timestamp_from_ms(1_700_000_000_789)),
            kind: Some(room_event::Kind::LoveTotal(LoveTotal { total })),
        }
    }

    fn decode(frame: &Frame) -> SubscribeResponse {
        let bytes = frame.to_bytes();
        assert_eq!(bytes.len(), frame.encoded_len());
        SubscribeResponse::decode(bytes).unwrap()
    }

    fn event(event: RoomEvent) -> SubscribeResponse {
        SubscribeResponse {
            message: Some(subscribe_response::Message::Event(event)),
            written_at: None,
        }
    }

    #[test]
    fn an_ordered_event_decodes_to_the_response_prost_would_send() {
        for text in ["", "hi", &"long ".repeat(100)] {
            let original = comment(77, text);
            let frame = Ordered::new(&original).frame();
            assert_eq!(decode(&frame), event(original.clone()));
            // Byte for byte what prost writes.
            assert_eq!(frame.to_bytes(), event(original).encode_to_vec());
        }
    }

    #[test]
    fn a_latest_value_carries_each_streams_own_position() {
        let shared = Latest::new(&RoomEvent {
            // A position on the published event is replaced by the stream's.
            epoch: 5,
            offset: 6,
            ..total(1_234)
        });
        for position in [(0, 0), (1, 0), (1_700_000_000_123, 1), (u64::MAX, u64::MAX)] {
            let expected = RoomEvent {
                epoch: position.0,
                offset: position.1,
                ..total(1_234)
            };
            assert_eq!(decode(&shared.frame(position)), event(expected));
        }
    }

    #[test]
    fn a_batch_decodes_to_its_events_in_order() {
        let ordered: Vec<RoomEvent> = (1..=40)
            .map(|i| comment(i, &"x".repeat(i as usize)))
            .collect();
        let count = RoomEvent {
            kind: Some(room_event::Kind::ViewerCount(ViewerCount { count: 3 })),
            ..total(0)
        };
        let mut batch = BatchWriter::new();
        for event in &ordered {
            batch.push_ordered(&Ordered::new(event));
        }
        batch.push_latest(&Latest::new(&total(99)), (1_700_000_000_123, 40));
        batch.push_latest(&Latest::new(&count), (1_700_000_000_123, 40));
        let frame = batch.finish().unwrap();
        let mut expected = ordered;
        expected.push(RoomEvent {
            epoch: 1_700_000_000_123,
            offset: 40,
            ..total(99)
        });
        expected.push(RoomEvent {
            epoch: 1_700_000_000_123,
            offset: 40,
            ..count
        });
        assert_eq!(
            decode(&frame),
            SubscribeResponse {
                message: Some(subscribe_response::Message::Batch(EventBatch {
                    events: expected
                })),
                written_at: None,
            }
        );
    }

    #[test]
    fn batch_lengths_of_every_varint_size_decode() {
        // Element lengths crossing 1-, 2- and 3-byte length prefixes.
        for size in [0, 100, 127, 128, 200, 16_383, 16_384, 70_000] {
            let mut batch = BatchWriter::new();
            batch.push_ordered(&Ordered::new(&comment(1, &"y".repeat(size))));
            let frame = batch.finish().unwrap();
            match decode(&frame).message {
                Some(subscribe_response::Message::Batch(b)) => {
                    assert_eq!(b.events, vec![comment(1, &"y".repeat(size))]);
                }
                other => panic!("not a batch: {other:?}"),
            }
        }
        assert!(BatchWriter::new().finish().is_none());
    }

    #[test]
    fn a_stamped_frame_carries_its_write_time_and_the_same_message() {
        let mut batch = BatchWriter::new();
        batch.push_ordered(&Ordered::new(&comment(3, "in a batch")));
        let frames = [
            Ordered::new(&comment(1, "short")).frame(),
            Ordered::new(&comment(2, &"long ".repeat(100))).frame(),
            Latest::new(&total(7)).frame((1_700_000_000_123, 2)),
            batch.finish().unwrap(),
            Frame::message(&SubscribeResponse::default()),
        ];
        for frame in frames {
            let unstamped = decode(&frame);
            let before = std::time::SystemTime::now();
            let bytes = frame.clone().stamped().to_bytes();
            let after = std::time::SystemTime::now();
            assert!(bytes.len() <= frame.encoded_len() + STAMP_BYTES);
            let stamped = SubscribeResponse::decode(bytes).unwrap();
            let written = std::time::SystemTime::try_from(stamped.written_at.unwrap()).unwrap();
            assert!(
                before <= written && written <= after,
                "{written:?} not in [{before:?}, {after:?}]"
            );
            assert_eq!(
                SubscribeResponse {
                    written_at: None,
                    ..stamped
                },
                unstamped
            );
            assert_eq!(unstamped.written_at, None);
        }
    }

    #[test]
    fn a_frame_stays_two_cache_lines() {
        // Every stream of a room moves each of its frames through a poll.
        assert_eq!(size_of::<Frame>(), 128);
    }
}
