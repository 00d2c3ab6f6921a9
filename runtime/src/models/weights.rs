//! A checkpoint's tensors by name, for models assembled from functional operations rather than
//! a `VarStore` (their modules' shapes come from the weights themselves).

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use super::LoadError;

/// Every tensor of a checkpoint, on the model's device and kind.
#[derive(Debug)]
pub struct NamedWeights {
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

impl NamedWeights {
    /// Reads every tensor of `files` (a checkpoint's shards).
    pub fn load(files: &[PathBuf], device: Device, kind: Kind) -> Result<NamedWeights, LoadError> {
        let mut tensors = HashMap::new();
        for file in files {
            for (name, tensor) in Tensor::read_safetensors(file)? {
                tensors.insert(name, tensor.to_device(device).to_kind(kind));
            }
        }
        Ok(NamedWeights {
            tensors,
            path: files.first().map_or_else(PathBuf::new, |f| f.clone()),
        })
    }

    /// The tensor `name`; its absence is an error naming it.
    pub fn get(&self, name: &str) -> Result<Tensor, LoadError> {
        self.tensors
            .get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| LoadError::Invalid {
                path: self.path.clone(),
                message: format!("weight missing from the checkpoint: {name}"),
            })
    }

    pub fn optional(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).map(Tensor::shallow_clone)
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A convolution's weight: plain, or folded (g · v / ‖v‖) from its weight-norm parts under
    /// either name PyTorch gives them.
    pub fn conv_weight(&self, prefix: &str) -> Result<Tensor, LoadError> {
        if let Some(weight) = self.optional(&format!("{prefix}.weight")) {
            return Ok(weight);
        }
        let parts = [
            ("weight_g", "weight_v"),
            (
                "parametrizations.weight.original0",
                "parametrizations.weight.original1",
            ),
        ];
        for (g, v) in parts {
            if let (Some(g), Some(v)) = (
                self.optional(&format!("{prefix}.{g}")),
                self.optional(&format!("{prefix}.{v}")),
            ) {
                let dims: Vec<i64> = (1..v.dim() as i64).collect();
                let norm = v.norm_scalaropt_dim(2, dims.as_slice(), true);
                return Ok(v * (g / norm));
            }
        }
        self.get(&format!("{prefix}.weight"))
    }

    /// A linear layer's weight and bias.
    pub fn linear(&self, prefix: &str) -> Result<(Tensor, Option<Tensor>), LoadError> {
        Ok((
            self.get(&format!("{prefix}.weight"))?,
            self.optional(&format!("{prefix}.bias")),
        ))
    }
}
