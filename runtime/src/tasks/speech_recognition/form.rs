//! Multipart forms with explicit limits: the fields an endpoint knows, how many, how large.

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::header;

use crate::error::ApiError;

use super::AudioLimits;

/// Form fields the multipart endpoints take; any other is refused by name.
const FORM_FIELDS: &[&str] = &[
    "file",
    "model",
    "language",
    "prompt",
    "response_format",
    "temperature",
    "timestamp_granularities[]",
    "timestamp_granularities",
    "stream",
    "task",
];
/// Fields a form may carry in all, counting repeats.
const MAX_FORM_FIELDS: usize = 16;
/// Size of each text field.
const MAX_TEXT_FIELD_BYTES: u64 = 64 * 1024;

/// A multipart form: the audio file and the text fields.
#[derive(Debug, Default)]
pub struct Form {
    pub file: Option<Bytes>,
    /// Text fields in the order sent, repeats included.
    pub fields: Vec<(String, String)>,
}

impl Form {
    /// Size of the uploaded file, when the form has one.
    pub fn file_len(&self) -> Option<usize> {
        self.file.as_ref().map(Bytes::len)
    }

    /// The first text field called `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn form_error(error: multer::Error) -> ApiError {
    match error {
        multer::Error::UnknownField { field_name } => ApiError::InvalidField(format!(
            "{}: not a field of this endpoint; fields: {}",
            field_name.unwrap_or_default(),
            FORM_FIELDS.join(", ")
        )),
        multer::Error::FieldSizeExceeded { limit, field_name } => ApiError::FieldTooLarge {
            field: field_name.unwrap_or_default(),
            limit,
        },
        multer::Error::StreamSizeExceeded { limit } => ApiError::BodyTooLarge {
            limit: limit as usize,
        },
        other => ApiError::MalformedBody(format!("multipart body: {other}")),
    }
}

pub async fn read_form(request: Request, limits: AudioLimits) -> Result<Form, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    parse_form(
        &content_type,
        request.into_body().into_data_stream(),
        limits,
    )
    .await
}

/// Reads a multipart body with this endpoint's limits: the fields it knows, at most
/// `MAX_FORM_FIELDS` of them, text fields of `MAX_TEXT_FIELD_BYTES`, one `file` of the upload
/// limit (multer sets none by default).
pub async fn parse_form<S, E>(
    content_type: &str,
    body: S,
    limits: AudioLimits,
) -> Result<Form, ApiError>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let boundary = multer::parse_boundary(content_type).map_err(|_| {
        ApiError::UnsupportedMediaType(
            "send the audio as multipart/form-data with a `file` field".to_owned(),
        )
    })?;
    let upload = limits.max_audio_bytes as u64;
    let constraints = multer::Constraints::new()
        .allowed_fields(FORM_FIELDS.to_vec())
        .size_limit(
            multer::SizeLimit::new()
                .whole_stream(upload + MAX_FORM_FIELDS as u64 * MAX_TEXT_FIELD_BYTES)
                .per_field(MAX_TEXT_FIELD_BYTES)
                .for_field("file", upload),
        );
    let mut multipart = multer::Multipart::with_constraints(body, boundary, constraints);
    let mut form = Form::default();
    let mut count = 0;
    while let Some(field) = multipart.next_field().await.map_err(form_error)? {
        count += 1;
        if count > MAX_FORM_FIELDS {
            return Err(ApiError::InvalidField(format!(
                "the form has more than {MAX_FORM_FIELDS} fields"
            )));
        }
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            if form.file.is_some() {
                return Err(ApiError::InvalidField(
                    "file: one audio file per request".to_owned(),
                ));
            }
            form.file = Some(field.bytes().await.map_err(form_error)?);
        } else {
            let text = field.text().await.map_err(form_error)?;
            form.fields.push((name, text));
        }
    }
    Ok(form)
}
