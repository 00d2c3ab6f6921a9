//! The model-thread half of `tabular`: a TorchScript module, one request a pass.

use std::path::Path;

use serde_json::{Value, json};
use tch::{CModule, Device, Kind, Tensor};

use crate::error::BackendError;
use crate::executor::{Backend, Wanted, Work, one_at_a_time};
use crate::models::LoadError;

use super::signature::Dtype;

/// The model thread's half.
#[derive(Debug)]
pub struct TabularModel {
    module: CModule,
    device: Device,
    kind: Kind,
}

impl TabularModel {
    pub fn load(dir: &Path, device: Device, dtype: Dtype) -> Result<TabularModel, LoadError> {
        let mut module = CModule::load_on_device(dir.join("model.pt"), device)?;
        module.set_eval();
        Ok(TabularModel {
            module,
            device,
            kind: dtype.kind(),
        })
    }

    /// (values, rows, columns) → the output as JSON: a list per row, or a value per row.
    fn predict(
        &mut self,
        Matrix {
            values,
            rows,
            columns,
        }: Matrix,
    ) -> Result<Value, BackendError> {
        let _guard = tch::no_grad_guard();
        let input = Tensor::from_slice(&values)
            .view([rows as i64, columns as i64])
            .to_kind(self.kind)
            .to_device(self.device);
        let output = self.module.forward_ts(&[input])?;
        let output = output.to_kind(Kind::Double).to_device(Device::Cpu);
        let flat = Vec::<f64>::try_from(output.flatten(0, -1))?;
        Ok(match output.size().as_slice() {
            [_, width] if *width > 0 => json!(flat.chunks(*width as usize).collect::<Vec<_>>()),
            _ => json!(flat),
        })
    }
}

impl Backend for TabularModel {
    type Job = Matrix;
    type Output = Value;

    fn run_batch(
        &mut self,
        jobs: Vec<Matrix>,
        wanted: &Wanted<'_>,
    ) -> Vec<Result<Value, BackendError>> {
        one_at_a_time(jobs, wanted, |matrix, _| self.predict(matrix))
    }
}

/// One request's rows, as the model takes them: `rows × columns` values, row by row.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub values: Vec<f64>,
    pub rows: usize,
    pub columns: usize,
}

/// One request at a time: a pass is one job.
impl Work for Matrix {}
