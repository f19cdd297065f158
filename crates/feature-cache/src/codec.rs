//! Turning values into bytes for the disk tier.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Error;

/// Encodes values to bytes and back for the disk tier.
pub trait Codec<V>: Send + Sync {
    /// The bytes of `value`.
    fn encode(&self, value: &V) -> Result<Vec<u8>, Error>;
    /// The value in `bytes`.
    fn decode(&self, bytes: &[u8]) -> Result<V, Error>;
}

/// The default codec: JSON through serde.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl<V: Serialize + DeserializeOwned> Codec<V> for JsonCodec {
    fn encode(&self, value: &V) -> Result<Vec<u8>, Error> {
        serde_json::to_vec(value).map_err(|e| Error::Codec {
            what: std::any::type_name::<V>().to_string(),
            message: e.to_string(),
        })
    }

    fn decode(&self, bytes: &[u8]) -> Result<V, Error> {
        serde_json::from_slice(bytes).map_err(|e| Error::Codec {
            what: std::any::type_name::<V>().to_string(),
            message: e.to_string(),
        })
    }
}
