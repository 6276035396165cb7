//! The protobuf codec of the generated agsync service and client: prost's,
//! with a smaller encode buffer for Subscribe's responses. tonic gives every
//! call and every open stream an encode buffer of 8 KiB up front; a
//! notification is ~100 bytes, and a server holds thousands of Subscribe
//! streams. Their buffer starts at 1 KiB (it grows on demand, e.g. for a
//! burst of replayed events). Measured with `agsync-bench run --workload
//! fanout --subscribers 5000`: RSS with the subscribers 53.6/53.9 MB against
//! 68.5/68.6 MB. Other calls keep tonic's default: with 1 KiB buffers for
//! every call, creates were ~8% slower (19.4k/20.6k/18.3k against
//! 21.7k/21.1k/21.5k per second, alternating runs). Its `Decoder` answers a
//! request message that does not decode with INVALID_ARGUMENT (the caller's
//! input), not tonic's INTERNAL.

use std::any::TypeId;
use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Initial size of a Subscribe stream's encode buffer.
const SUBSCRIBE_BUFFER_BYTES: usize = 1024;
/// A stream's encoded messages are handed to HTTP/2 once they pass this
/// (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec`, with `SUBSCRIBE_BUFFER_BYTES` for encoding
/// `SubscribeResponse`s.
#[derive(Debug, Clone, Copy)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        if TypeId::of::<T>() == TypeId::of::<crate::pb::SubscribeResponse>() {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(
                SUBSCRIBE_BUFFER_BYTES,
                YIELD_THRESHOLD,
            ))
        } else {
            ProstCodec::<T, U>::default().encoder()
        }
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(ProstCodec::<T, U>::default().decoder())
    }
}

/// prost's decoder. A message it cannot decode is INVALID_ARGUMENT when it
/// is a request (the caller's input: bytes that are not the message, or a
/// body nested past protobuf's recursion limit), not tonic's INTERNAL. It
/// fails only on such input, so its errors need no reading.
#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            if std::any::type_name::<U>().ends_with("Request") {
                Status::invalid_argument(format!(
                    "the request is not a valid protobuf message, or nests deeper than protobuf decoding allows (about 33 levels of JSON objects): {}",
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
