//! An MLflow tensor-spec signature and the request forms MLflow serving accepts: rows are
//! checked against it (shape and dtype) before the model sees them.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;
use tch::Kind;

use crate::error::ApiError;
use crate::models::{LoadError, read_json};

use super::backend::Matrix;

/// Element types of an MLflow tensor spec that a JSON body can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    Float32,
    Float64,
    Int32,
    Int64,
}

impl Dtype {
    pub fn kind(self) -> Kind {
        match self {
            Dtype::Float32 => Kind::Float,
            Dtype::Float64 => Kind::Double,
            Dtype::Int32 => Kind::Int,
            Dtype::Int64 => Kind::Int64,
        }
    }

    fn is_integer(self) -> bool {
        matches!(self, Dtype::Int32 | Dtype::Int64)
    }
}

#[derive(Debug, Clone, Deserialize)]
struct TensorSpecEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "tensor-spec")]
    spec: Option<TensorSpec>,
}

/// One tensor of the signature: `{"dtype": "float32", "shape": [-1, 4]}`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TensorSpec {
    pub dtype: Dtype,
    pub shape: Vec<i64>,
}

/// The model's signature: one input tensor of rank 1 or 2 (rows first), and its outputs.
#[derive(Debug, Clone)]
pub struct Signature {
    pub input: TensorSpec,
    /// `inputs` and `outputs` as written, echoed in every response's `meta`.
    pub input_schema: Value,
    pub output_schema: Value,
}

impl Signature {
    /// Reads `signature.json`; `inputs`/`outputs` may be arrays or, as in an MLmodel file, JSON
    /// strings holding arrays.
    pub fn load(dir: &Path) -> Result<Signature, LoadError> {
        let path = dir.join("signature.json");
        let invalid = |message: String| LoadError::Invalid {
            path: path.clone(),
            message,
        };
        let raw: Value = read_json(&path)?;
        let unwrap = |v: &Value| -> Result<Value, LoadError> {
            match v {
                Value::String(text) => {
                    serde_json::from_str(text).map_err(|e| invalid(e.to_string()))
                }
                Value::Array(_) => Ok(v.clone()),
                _ => Err(invalid(
                    "inputs and outputs must be lists of tensor specs".to_owned(),
                )),
            }
        };
        let input_schema = unwrap(&raw["inputs"])?;
        let output_schema = if raw.get("outputs").is_some() {
            unwrap(&raw["outputs"])?
        } else {
            Value::Null
        };
        let entries: Vec<TensorSpecEntry> = serde_json::from_value(input_schema.clone())
            .map_err(|e| invalid(format!("inputs: {e}")))?;
        let [entry] = entries.as_slice() else {
            return Err(invalid(format!(
                "the signature has {} inputs; one input tensor is supported",
                entries.len()
            )));
        };
        let input = match (&entry.kind[..], &entry.spec) {
            ("tensor", Some(spec)) if (1..=2).contains(&spec.shape.len()) => spec.clone(),
            ("tensor", Some(spec)) => {
                return Err(invalid(format!(
                    "input shape {:?}: rank 1 or 2 is supported",
                    spec.shape
                )));
            }
            (kind, _) => {
                return Err(invalid(format!(
                    "input type {kind:?}: only tensor specs are supported"
                )));
            }
        };
        Ok(Signature {
            input,
            input_schema,
            output_schema,
        })
    }

    /// Rows of the request as a flat, validated matrix.
    pub fn rows(&self, rows: &[Value]) -> Result<Matrix, ApiError> {
        let mismatch = |message: String| ApiError::SchemaMismatch(message);
        if rows.is_empty() {
            return Err(mismatch("no rows to predict".to_owned()));
        }
        let columns = match self.input.shape.as_slice() {
            [_] => 1,
            [_, columns] => usize::try_from(*columns)
                .ok()
                .filter(|&c| c > 0)
                .unwrap_or_else(|| rows[0].as_array().map_or(1, Vec::len)),
            _ => unreachable!("rank checked when the signature was loaded"),
        };
        let mut values = Vec::with_capacity(rows.len() * columns);
        for (r, row) in rows.iter().enumerate() {
            let cells: Vec<&Value> = match (row, self.input.shape.len()) {
                (Value::Array(cells), 2) => cells.iter().collect(),
                (cell, 1) if !cell.is_array() => vec![cell],
                _ => {
                    return Err(mismatch(format!(
                        "row {r}: expected {}, the signature's shape is {:?}",
                        if self.input.shape.len() == 2 {
                            "a list of values"
                        } else {
                            "a single value"
                        },
                        self.input.shape
                    )));
                }
            };
            if cells.len() != columns {
                return Err(mismatch(format!(
                    "row {r} has {} values; the signature expects {columns}",
                    cells.len()
                )));
            }
            for (c, cell) in cells.into_iter().enumerate() {
                let value = match (cell.as_f64(), self.input.dtype.is_integer()) {
                    (Some(v), true) if cell.as_i64().is_some() => v,
                    (Some(v), false) => v,
                    _ => {
                        return Err(mismatch(format!(
                            "row {r} column {c} is {cell}; the signature's dtype is {:?}",
                            self.input.dtype
                        )));
                    }
                };
                values.push(value);
            }
        }
        Ok(Matrix {
            values,
            rows: rows.len(),
            columns,
        })
    }
}

/// The request forms MLflow serving accepts: a row, rows, `{inputs}`, `{instances}` or
/// `{dataframe_split: {columns, data}}`.
pub fn request_rows(body: Value) -> Result<Vec<Value>, ApiError> {
    let as_rows = |value: Value, field: &str| match value {
        Value::Array(items) if items.first().is_some_and(Value::is_array) => Ok(items),
        Value::Array(items) if !items.is_empty() => Ok(vec![Value::Array(items)]),
        Value::Array(_) => Err(ApiError::SchemaMismatch(format!("{field} is empty"))),
        _ => Err(ApiError::InvalidField(format!(
            "{field} must be a list of rows"
        ))),
    };
    match body {
        Value::Array(_) => as_rows(body, "body"),
        Value::Object(mut object) => {
            if let Some(inputs) = object.remove("inputs") {
                as_rows(inputs, "inputs")
            } else if let Some(instances) = object.remove("instances") {
                as_rows(instances, "instances")
            } else if let Some(mut split) = object.remove("dataframe_split") {
                as_rows(
                    split
                        .get_mut("data")
                        .map(Value::take)
                        .unwrap_or(Value::Null),
                    "dataframe_split.data",
                )
            } else {
                Err(ApiError::InvalidField(
                    "expected a row, a list of rows, or {inputs}, {instances} or {dataframe_split}"
                        .to_owned(),
                ))
            }
        }
        _ => Err(ApiError::InvalidField(
            "expected a row, a list of rows, or an object".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn signature(dtype: Dtype, shape: Vec<i64>) -> Signature {
        Signature {
            input: TensorSpec { dtype, shape },
            input_schema: Value::Null,
            output_schema: Value::Null,
        }
    }

    #[test]
    fn every_mlflow_request_form_yields_the_same_rows() {
        let rows = json!([[1.0, 2.0], [3.0, 4.0]]);
        let forms = [
            rows.clone(),
            json!({"inputs": rows}),
            json!({"instances": rows}),
            json!({"dataframe_split": {"columns": ["a", "b"], "data": rows}}),
        ];
        for form in forms {
            assert_eq!(
                request_rows(form).unwrap(),
                rows.as_array().unwrap().clone()
            );
        }
        assert_eq!(
            request_rows(json!([1.0, 2.0])).unwrap(),
            vec![json!([1.0, 2.0])]
        );
    }

    #[test]
    fn rows_are_checked_against_the_signature_shape_and_dtype() {
        let floats = signature(Dtype::Float32, vec![-1, 2]);
        assert_eq!(
            floats.rows(&[json!([1, 2.5]), json!([3, 4])]).unwrap(),
            Matrix {
                values: vec![1.0, 2.5, 3.0, 4.0],
                rows: 2,
                columns: 2
            }
        );
        let short = floats.rows(&[json!([1.0])]).unwrap_err().to_string();
        assert!(
            short.contains("row 0 has 1 values; the signature expects 2"),
            "{short}"
        );
        let text = floats.rows(&[json!([1.0, "x"])]).unwrap_err().to_string();
        assert!(text.contains("row 0 column 1"), "{text}");
        let ints = signature(Dtype::Int64, vec![-1, 2]);
        assert!(
            ints.rows(&[json!([1, 2.5])])
                .unwrap_err()
                .to_string()
                .contains("Int64")
        );
        assert!(matches!(floats.rows(&[]), Err(ApiError::SchemaMismatch(_))));
    }

    #[test]
    fn malformed_bodies_name_what_is_expected() {
        assert!(
            request_rows(json!({"rows": []}))
                .unwrap_err()
                .to_string()
                .contains("dataframe_split")
        );
        assert!(request_rows(json!("text")).is_err());
        assert!(
            request_rows(json!({"inputs": 3}))
                .unwrap_err()
                .to_string()
                .contains("inputs")
        );
    }
}
