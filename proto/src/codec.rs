//! The gRPC codec of every Switchyard service and client: prost, with smaller first buffers.
//!
//! tonic gives each call an encode buffer (and each streaming request a decode buffer) of
//! 8 KiB up front. A router holds one per open `Generate` call, and its messages are tens of
//! bytes (a token chunk, a start), so 8 KiB a call was a third of the router's memory per open
//! stream. Buffers start at 1 KiB here and grow to whatever a larger message needs.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Bytes a call's encode or decode buffer starts with.
const FIRST_BUFFER_BYTES: usize = 1024;
/// Encoded bytes after which a stream of ready messages is flushed (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn buffers() -> BufferSettings {
    BufferSettings::new(FIRST_BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// [`ProstCodec`] with [`FIRST_BUFFER_BYTES`] buffers (set as the generated code's codec).
#[derive(Debug, Clone)]
pub struct SwitchyardCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SwitchyardCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for SwitchyardCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(buffers())
    }
}
