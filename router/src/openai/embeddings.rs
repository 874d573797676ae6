//! OpenAI's `/v1/embeddings`: every input becomes one embedding request (`embed`), placed like
//! any request — on a worker whose engine embeds (GPU workers running the model; wafer-scale
//! gateways cannot), in the cost-sensitive lane unless the client's `x-switchyard-class` or its
//! tenant says otherwise — and the vectors come back in the inputs' order, as floats or as
//! base64 of little-endian `f32`s (what the official SDKs ask for).

use std::sync::Arc;

use axum::http::HeaderMap;
use axum::response::{IntoResponse as _, Response};
use axum::{Json, http::StatusCode};
use base64::Engine as _;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard_proto::v1;
use switchyard_proto::v1::server_frame::Frame;
use tonic::Code;

use super::ApiError;
use super::handlers::{self, Call, Placement};
use super::wire;
use crate::auth::Tenant;
use crate::dispatch::Dispatcher;

pub const EMBEDDINGS_ROUTE: &str = "/v1/embeddings";

/// Most inputs one request may carry (OpenAI's own limit).
pub const MAX_INPUTS: usize = 2048;

/// Inputs of one request placed at a time: the rest wait their turn here, not in the router's
/// queue, where a request of 2 048 inputs would crowd out every other client's.
const IN_FLIGHT: usize = 32;

/// The fields of an embeddings request (`user` is accepted and unused, as an opaque id).
#[derive(Debug, Deserialize)]
struct EmbeddingFields {
    model: Option<String>,
    input: Option<Value>,
    encoding_format: Option<String>,
    dimensions: Option<u32>,
    #[serde(rename = "user")]
    _user: Option<String>,
}

/// How the vectors are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Float,
    /// The vector's little-endian `f32` bytes in standard base64.
    Base64,
}

impl Encoding {
    fn parse(format: Option<&str>) -> Result<Self, ApiError> {
        match format {
            None | Some("float") => Ok(Encoding::Float),
            Some("base64") => Ok(Encoding::Base64),
            Some(other) => Err(ApiError::invalid(
                "encoding_format",
                format!("is {other:?}, must be \"float\" or \"base64\""),
            )),
        }
    }

    fn write(self, vector: &[f32]) -> Written<'_> {
        match self {
            Encoding::Float => Written::Floats(vector),
            Encoding::Base64 => {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Written::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        }
    }
}

/// A vector as the answer carries it. Floats are written straight from the `f32`s: each in its
/// shortest form (`-0.57735026`), not widened to a `f64`'s seventeen digits.
#[derive(Serialize)]
#[serde(untagged)]
enum Written<'v> {
    Floats(&'v [f32]),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingObject<'v> {
    object: &'static str,
    index: usize,
    embedding: Written<'v>,
}

#[derive(Serialize)]
struct EmbeddingList<'v> {
    object: &'static str,
    data: Vec<EmbeddingObject<'v>>,
    model: String,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

pub async fn embeddings(call: Call) -> Response {
    call.answer(EMBEDDINGS_ROUTE, None, embed).await
}

async fn embed(call: Call, id: String) -> Result<Response, ApiError> {
    let Call {
        dispatcher,
        tenant,
        headers,
        body,
    } = call;
    let body = handlers::read_body(body)?;
    let fields: EmbeddingFields = wire::typed(&wire::json_object(&body)?)?;
    let model = wire::required_model(fields.model)?;
    let encoding = Encoding::parse(fields.encoding_format.as_deref())?;
    if fields.dimensions == Some(0) {
        return Err(ApiError::invalid("dimensions", "must be at least 1"));
    }
    let inputs = wire::prompts("input", fields.input)?;
    if inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "has {} inputs, at most {MAX_INPUTS} a request (send the rest in further requests)",
                inputs.len()
            ),
        ));
    }
    let many = inputs.len() > 1;
    let embedded: Vec<(Placement, v1::Finished)> =
        futures::stream::iter(inputs.into_iter().enumerate())
            .map(|(index, input)| {
                let mut request = v1::GenerateRequest {
                    model: model.clone(),
                    embed: true,
                    ..Default::default()
                };
                input.put_in(&mut request);
                let id = match many {
                    true => format!("{id}-{index}"),
                    false => id.clone(),
                };
                let (dispatcher, tenant, headers) = (&dispatcher, tenant.clone(), &headers);
                async move {
                    embed_one(dispatcher, tenant, headers, request, id)
                        .await
                        .map_err(|error| in_words_of_inputs(error, many.then_some(index)))
                }
            })
            .buffered(IN_FLIGHT)
            .try_collect()
            .await?;
    let dimensions = embedded.first().map_or(0, |(_, f)| f.embedding.len());
    if let Some(asked) = fields
        .dimensions
        .filter(|asked| *asked as usize != dimensions)
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!(
                "is {asked}, but model {model:?} embeds in {dimensions} dimensions and cannot \
                 shorten its vectors: leave dimensions out"
            ),
        ));
    }
    let prompt_tokens: u32 = embedded
        .iter()
        .filter_map(|(_, f)| f.usage.map(|u| u.prompt_tokens))
        .sum();
    let data = embedded
        .iter()
        .enumerate()
        .map(|(index, (_, finished))| EmbeddingObject {
            object: "embedding",
            index,
            embedding: encoding.write(&finished.embedding),
        })
        .collect();
    let list = EmbeddingList {
        object: "list",
        data,
        model,
        usage: EmbeddingUsage {
            prompt_tokens,
            total_tokens: prompt_tokens,
        },
    };
    let mut response = (StatusCode::OK, Json(list)).into_response();
    let placements = || embedded.iter().map(|(placement, _)| placement);
    handlers::tag(
        &mut response,
        &handlers::distinct(placements().map(|p| p.lane.as_str())),
        &handlers::distinct(placements().map(|p| p.pool.as_str())),
        &handlers::distinct(placements().map(|p| p.worker.as_str())),
        &id,
    );
    Ok(response)
}

/// Places one input's embedding request and waits for its vector.
async fn embed_one(
    dispatcher: &Arc<Dispatcher>,
    tenant: Option<Tenant>,
    headers: &HeaderMap,
    request: v1::GenerateRequest,
    id: String,
) -> Result<(Placement, v1::Finished), ApiError> {
    let (placement, mut frames) =
        handlers::place_one(dispatcher, tenant, headers, request, None, id).await?;
    loop {
        match handlers::next_frame_of_one(&mut frames).await? {
            Frame::Finished(finished) if !finished.embedding.is_empty() => {
                return Ok((placement, finished));
            }
            Frame::Finished(_) => {
                return Err(ApiError::from_code(
                    Code::Internal,
                    &format!(
                        "worker {} ended the embedding request without a vector",
                        placement.worker
                    ),
                ));
            }
            Frame::Failed(failed) => return Err(ApiError::from_failed(&failed)),
            _ => {}
        }
    }
}

/// A refusal in the embeddings API's words: the dispatcher's `prompt` is `input` (`input[i]`
/// of several), its `prompt_token_ids[k]` the input's id `k`, and `embed` (no worker of the
/// model can) the `model`.
fn in_words_of_inputs(error: ApiError, index: Option<usize>) -> ApiError {
    let input = match index {
        Some(i) => format!("input[{i}]"),
        None => "input".to_string(),
    };
    error.renaming_param(|param| match param {
        "prompt" | "prompt_token_ids" => Some(input.clone()),
        "embed" => Some("model".into()),
        _ => {
            let id = param.strip_prefix("prompt_token_ids")?;
            Some(format!("{input}{id}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_floats_or_base64_of_little_endian_f32s() {
        let vector = [1.0f32, -0.5, 0.1];
        let written = |encoding: Encoding| {
            serde_json::to_string(&encoding.write(&vector)).expect("serializes")
        };
        assert_eq!(written(Encoding::Float), "[1.0,-0.5,0.1]");
        let Ok(Value::String(encoded)) = serde_json::from_str(&written(Encoding::Base64)) else {
            panic!("base64 is a string");
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        assert_eq!(bytes[..8], [0, 0, 128, 63, 0, 0, 0, 191]);
        assert_eq!(Encoding::parse(None).unwrap(), Encoding::Float);
        let wrong = Encoding::parse(Some("int8")).unwrap_err();
        assert_eq!(wrong.param.as_deref(), Some("encoding_format"));
    }

    #[test]
    fn refusals_name_the_input_at_fault() {
        let named = |param: &str, index| {
            in_words_of_inputs(ApiError::invalid(param, "why"), index)
                .param
                .expect("param")
        };
        assert_eq!(named("prompt", None), "input");
        assert_eq!(named("prompt", Some(3)), "input[3]");
        assert_eq!(named("prompt_token_ids[7]", None), "input[7]");
        assert_eq!(named("prompt_token_ids[7]", Some(2)), "input[2][7]");
        assert_eq!(named("embed", Some(2)), "model");
        assert_eq!(named("model", None), "model");
    }
}
