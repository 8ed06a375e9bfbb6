//! The codec of every generated service and client: prost, with small
//! initial buffers.
//!
//! tonic's default encode buffer is 8 KiB per call. A subscribe node holds
//! up to 100,000 server streams, each with its own encode buffer for as
//! long as the stream lives, while a room event is about 60 bytes. Measured
//! with `bench fanout` (20,000 idle streams, mimalloc): 10.7 KB of RSS per
//! stream with 8 KiB buffers, 2.7 KB with these. They start at
//! [`BUFFER_BYTES`] and grow as a message needs.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// Initial size of each call's encode and decode buffer.
pub const BUFFER_BYTES: usize = 512;
/// Encoded messages are handed to the transport once this many bytes wait.
const YIELD_BYTES: usize = 32 * 1024;

/// prost encoding with [`BUFFER_BYTES`] initial buffers.
#[derive(Debug)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = LeanDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        LeanDecoder(PhantomData)
    }
}

/// prost decoding with [`BUFFER_BYTES`] buffers; malformed bytes are
/// `INVALID_ARGUMENT` (see the module doc).
#[derive(Debug)]
pub struct LeanDecoder<U>(PhantomData<U>);

impl<U: prost::Message + Default> Decoder for LeanDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|err| {
            let name = std::any::type_name::<U>();
            let name = name.rsplit("::").next().unwrap_or(name);
            // prost's error names the field path and the wire problem, never
            // the bytes, so it stays short whatever was sent.
            Status::invalid_argument(format!(
                "the message is not a valid livemesh.v1.{name} ({err}); send a {name} \
                 encoded as protobuf"
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER_BYTES, YIELD_BYTES)
    }
}
