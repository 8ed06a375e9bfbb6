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

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

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
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(BufferSettings::new(BUFFER_BYTES, YIELD_BYTES))
    }
}
