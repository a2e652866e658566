//! The Open Inference Protocol ("KServe v2"), the subset an image classifier needs, shared by the
//! server's v2 endpoints and the v2 teacher client.
//!
//! - `GET /v2/health/live`, `GET /v2/health/ready`, `GET /v2` ([`ServerMetadata`]);
//! - `GET /v2/models/{name}` ([`ModelMetadata`]), `GET /v2/models/{name}/ready`;
//! - `POST /v2/models/{name}/infer`: an [`InferRequest`] answered by an [`InferResponse`], both
//!   JSON, or with the binary tensor data extension: the JSON part first, its length in the
//!   [`HEADER_LENGTH`] header, then each tensor's raw little-endian bytes in order, each tensor
//!   naming its size in `parameters.binary_data_size`.
//!
//! Tensor data in JSON may be flat or nested row-major arrays; [`Values`] reads both.

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Path prefix of every v2 endpoint.
pub const PREFIX: &str = "/v2";
/// Liveness endpoint.
pub const LIVE: &str = "/v2/health/live";
/// Readiness endpoint.
pub const READY: &str = "/v2/health/ready";
/// Where a model's endpoints live: `MODELS` + name.
pub const MODELS: &str = "/v2/models/";
/// Header giving the length of the JSON part of a body that carries binary tensor data.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// The binary tensor data extension's name in [`ServerMetadata::extensions`].
pub const BINARY_EXTENSION: &str = "binary_tensor_data";
/// Tensor parameter: bytes of this tensor's binary data.
pub const BINARY_DATA_SIZE: &str = "binary_data_size";
/// Output parameter: answer this output as binary data.
pub const BINARY_DATA: &str = "binary_data";
/// Request parameter: answer every output as binary data.
pub const BINARY_DATA_OUTPUT: &str = "binary_data_output";
/// Response parameter of this project's server: queries left for the key (absent: unlimited).
pub const REMAINING: &str = "remaining";

/// `GET /v2`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerMetadata {
    /// The server's name.
    pub name: String,
    /// The server's version.
    pub version: String,
    /// Protocol extensions the server supports.
    #[serde(default)]
    pub extensions: Vec<String>,
}

/// A tensor's name, element type and shape (`-1`: any size) in [`ModelMetadata`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorMetadata {
    /// Tensor name.
    pub name: String,
    /// Element type, e.g. `FP32`, `UINT8`, `INT64`.
    pub datatype: String,
    /// Shape; `-1` for a dimension of any size.
    pub shape: Vec<i64>,
}

/// `GET /v2/models/{name}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    /// Model name.
    pub name: String,
    /// Versions available (KServe writes `null`).
    #[serde(default)]
    pub versions: Option<Vec<String>>,
    /// The framework serving it.
    #[serde(default)]
    pub platform: String,
    /// Inputs.
    pub inputs: Vec<TensorMetadata>,
    /// Outputs.
    pub outputs: Vec<TensorMetadata>,
}

/// Free-form parameters of a request, tensor or answer.
pub type Parameters = serde_json::Map<String, serde_json::Value>;

/// A tensor of a request or an answer; `T` is its data: [`Data`] to write, [`Values`] to read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct Tensor<T> {
    /// Tensor name.
    pub name: String,
    /// Shape (all sizes known).
    pub shape: Vec<u64>,
    /// Element type.
    pub datatype: String,
    /// Parameters (e.g. [`BINARY_DATA_SIZE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
    /// Elements in JSON (absent when they travel as binary data).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
}

impl<T> Tensor<T> {
    /// Bytes of binary data this tensor declares, if it declares any.
    pub fn binary_size(&self) -> Option<u64> {
        self.parameters.as_ref()?.get(BINARY_DATA_SIZE)?.as_u64()
    }
}

/// An output a request asks for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestedOutput {
    /// Output name.
    pub name: String,
    /// Parameters (e.g. [`BINARY_DATA`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
}

/// `POST /v2/models/{name}/infer` body (its JSON part).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct InferRequest<T> {
    /// Request id, echoed in the answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Parameters (e.g. [`BINARY_DATA_OUTPUT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
    /// Input tensors.
    pub inputs: Vec<Tensor<T>>,
    /// Outputs wanted (absent: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<RequestedOutput>>,
}

/// `POST /v2/models/{name}/infer` answer (its JSON part).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound(serialize = "T: Serialize", deserialize = "T: Deserialize<'de>"))]
pub struct InferResponse<T> {
    /// Model name.
    pub model_name: String,
    /// Model version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The request's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Parameters (this project's server: [`REMAINING`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Parameters>,
    /// Output tensors.
    pub outputs: Vec<Tensor<T>>,
}

/// Tensor elements to write as JSON.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Data {
    /// `UINT8`.
    U8(Vec<u8>),
    /// `FP32`.
    F32(Vec<f32>),
    /// `INT64`.
    I64(Vec<i64>),
}

impl Data {
    /// The protocol's name of the element type.
    pub fn datatype(&self) -> &'static str {
        match self {
            Data::U8(_) => "UINT8",
            Data::F32(_) => "FP32",
            Data::I64(_) => "INT64",
        }
    }

    /// The elements as binary tensor data (little-endian).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            Data::U8(values) => values.clone(),
            Data::F32(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Data::I64(values) => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

impl Tensor<Data> {
    /// A tensor of `data`, its elements in the JSON, or (`binary`) named by size in its
    /// parameters and returned as the bytes to send after the JSON.
    pub fn carrying(name: &str, shape: Vec<u64>, data: Data, binary: bool) -> (Self, Vec<u8>) {
        let datatype = data.datatype().to_string();
        if !binary {
            return (Tensor { name: name.into(), shape, datatype, parameters: None, data: Some(data) }, Vec::new());
        }
        let bytes = data.to_le_bytes();
        let parameters = Some(parameter(BINARY_DATA_SIZE, bytes.len()));
        (Tensor { name: name.into(), shape, datatype, parameters, data: None }, bytes)
    }
}

/// Parameters holding one `name: value`.
pub fn parameter(name: &str, value: impl Into<serde_json::Value>) -> Parameters {
    Parameters::from_iter([(name.to_string(), value.into())])
}

/// Tensor elements read from JSON, flat or nested, as `f64` (exact for every `UINT8`, `INT32`
/// and `FP32` value; `INT64` beyond 2^53 is not a class index or a pixel).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Values(pub Vec<f64>);

impl<'de> Deserialize<'de> for Values {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut out = Vec::new();
        deserializer.deserialize_any(Flatten { out: &mut out, depth: 0 })?;
        Ok(Values(out))
    }
}

/// Deepest nesting of tensor data read (a tensor has few dimensions; the bound keeps hostile
/// input from overflowing the stack).
const MAX_DEPTH: usize = 16;

struct Flatten<'a> {
    out: &'a mut Vec<f64>,
    depth: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Flatten<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Flatten<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("numbers, or arrays of them")
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.out.push(v as f64);
        Ok(())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.out.push(v as f64);
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.out.push(v);
        Ok(())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.out.push(v as u8 as f64);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(serde::de::Error::custom(format!("tensor data nested deeper than {MAX_DEPTH}")));
        }
        let depth = self.depth + 1;
        while seq.next_element_seed(Flatten { out: &mut *self.out, depth })?.is_some() {}
        Ok(())
    }
}

/// A body of the binary tensor data extension: `json` (length in [`HEADER_LENGTH`]), then
/// `binary`.
pub fn with_binary(json: &[u8], binary: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(json.len() + binary.len());
    body.extend_from_slice(json);
    body.extend_from_slice(binary);
    body
}

/// Split a body into its JSON part and its binary data, given the [`HEADER_LENGTH`] header's
/// value (`None`: all JSON).
pub fn split_body<'a>(body: &'a [u8], header_length: Option<&str>) -> Result<(&'a [u8], &'a [u8]), String> {
    let Some(text) = header_length else { return Ok((body, &[])) };
    let n: usize = text.trim().parse().map_err(|_| format!("{HEADER_LENGTH} must be a byte count, not {text:?}"))?;
    if n > body.len() {
        return Err(format!("{HEADER_LENGTH} says {n} bytes of JSON; the body has {}", body.len()));
    }
    Ok(body.split_at(n))
}

/// Whether `parameters` holds `name: true`.
pub fn flag(parameters: Option<&Parameters>, name: &str) -> bool {
    parameters.and_then(|p| p.get(name)).and_then(serde_json::Value::as_bool).unwrap_or(false)
}

/// Elements of binary tensor data of `datatype`, as `f64`; `None` for a type this project does
/// not read or a length that is not whole elements.
pub fn decode_binary(datatype: &str, bytes: &[u8]) -> Option<Vec<f64>> {
    fn each<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f64) -> Option<Vec<f64>> {
        if !bytes.len().is_multiple_of(N) {
            return None;
        }
        Some(bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunks of N"))).collect())
    }
    match datatype {
        "UINT8" => each::<1>(bytes, |b| b[0] as f64),
        "INT8" => each::<1>(bytes, |b| b[0] as i8 as f64),
        "INT32" => each::<4>(bytes, |b| i32::from_le_bytes(b) as f64),
        "INT64" => each::<8>(bytes, |b| i64::from_le_bytes(b) as f64),
        "FP32" => each::<4>(bytes, |b| f32::from_le_bytes(b) as f64),
        "FP64" => each::<8>(bytes, f64::from_le_bytes),
        "FP16" => each::<2>(bytes, |b| f16_to_f64(u16::from_le_bytes(b))),
        _ => None,
    }
}

/// An IEEE half-precision value as `f64`.
fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = ((bits >> 10) & 0x1f) as i32;
    let fraction = (bits & 0x3ff) as f64;
    sign * match exponent {
        0 => fraction * 2f64.powi(-24),
        0x1f if fraction == 0.0 => f64::INFINITY,
        0x1f => f64::NAN,
        e => (1.0 + fraction / 1024.0) * 2f64.powi(e - 15),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_read_flat_and_nested_data() {
        let flat: Values = serde_json::from_str("[1, 2.5, -3]").unwrap();
        assert_eq!(flat.0, [1.0, 2.5, -3.0]);
        let nested: Values = serde_json::from_str("[[1, 2], [3, [4]]]").unwrap();
        assert_eq!(nested.0, [1.0, 2.0, 3.0, 4.0]);
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(serde_json::from_str::<Values>(&deep).unwrap_err().to_string().contains("nested deeper"));
        assert!(serde_json::from_str::<Values>("[\"a\"]").is_err());
    }

    #[test]
    fn binary_data_decodes_each_type() {
        assert_eq!(decode_binary("FP32", &Data::F32(vec![1.5, -2.0]).to_le_bytes()).unwrap(), [1.5, -2.0]);
        assert_eq!(decode_binary("INT64", &Data::I64(vec![7, -1]).to_le_bytes()).unwrap(), [7.0, -1.0]);
        assert_eq!(decode_binary("UINT8", &[0, 255]).unwrap(), [0.0, 255.0]);
        // Half precision: 1.0, -2.0, 0.5, the smallest subnormal.
        let halves = [0x3c00u16, 0xc000, 0x3800, 0x0001];
        let bytes: Vec<u8> = halves.iter().flat_map(|h| h.to_le_bytes()).collect();
        assert_eq!(decode_binary("FP16", &bytes).unwrap(), [1.0, -2.0, 0.5, 2f64.powi(-24)]);
        assert!(decode_binary("FP32", &[0, 0, 0]).is_none(), "not whole elements");
        assert!(decode_binary("BYTES", &[0; 8]).is_none());
    }

    #[test]
    fn bodies_split_at_the_declared_json_length() {
        let body = with_binary(b"{\"a\":1}", &[1, 2, 3]);
        assert_eq!(split_body(&body, Some("7")).unwrap(), (&b"{\"a\":1}"[..], &[1u8, 2, 3][..]));
        assert_eq!(split_body(&body, None).unwrap().1, &[] as &[u8]);
        assert!(split_body(&body, Some("11")).is_err());
        assert!(split_body(&body, Some("seven")).is_err());
    }
}
