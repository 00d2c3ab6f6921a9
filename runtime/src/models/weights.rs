//! A checkpoint's tensors by name, from which every model is assembled: each layer reads its
//! weights by the checkpoint's names, and loading ends with [`NamedWeights::finish`], which
//! refuses tensors the model did not read. A misnamed tensor is therefore an error (missing under
//! the name the model reads, unexpected under the name the checkpoint has), never a silently
//! dropped bias or a silently random weight.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::LoadError;

/// How many unexpected names an error lists before it counts the rest.
const NAMES_SHOWN: usize = 5;

/// Every tensor of a checkpoint, as read, and which of them the model has read.
#[derive(Debug)]
pub struct NamedWeights {
    tensors: HashMap<String, Tensor>,
    read: RefCell<BTreeSet<String>>,
    device: Device,
    kind: Kind,
    /// What errors name: the file, or the directory of a sharded checkpoint.
    path: PathBuf,
}

impl NamedWeights {
    /// Reads every tensor of `files` (a checkpoint's shards); each is moved to `device` and
    /// `kind` when the model reads it, so tensors it leaves unread never reach the device.
    pub fn load(files: &[PathBuf], device: Device, kind: Kind) -> Result<NamedWeights, LoadError> {
        let mut tensors = HashMap::new();
        for file in files {
            tensors.extend(Tensor::read_safetensors(file)?);
        }
        let path = match files {
            [file] => file.clone(),
            _ => files
                .first()
                .and_then(|f| f.parent())
                .map_or_else(PathBuf::new, Path::to_owned),
        };
        Ok(NamedWeights {
            tensors,
            read: RefCell::default(),
            device,
            kind,
            path,
        })
    }

    /// The tensor `name`; its absence is an error naming it.
    pub fn get(&self, name: &str) -> Result<Tensor, LoadError> {
        self.optional(name).ok_or_else(|| LoadError::Invalid {
            path: self.path.clone(),
            message: format!("weight missing from the checkpoint: {name}"),
        })
    }

    /// The tensor `name`, which must have the shape `shape`: the sizes a config sets, which the
    /// model's arithmetic relies on.
    pub fn get_sized(&self, name: &str, shape: &[i64]) -> Result<Tensor, LoadError> {
        let tensor = self.get(name)?;
        if tensor.size() != shape {
            return Err(LoadError::Invalid {
                path: self.path.clone(),
                message: format!(
                    "weight {name} has shape {:?}, the config implies {shape:?}",
                    tensor.size()
                ),
            });
        }
        Ok(tensor)
    }

    /// A tensor that some checkpoints of the architecture have and others not (a bias, say):
    /// read, and so expected, only when present.
    pub fn optional(&self, name: &str) -> Option<Tensor> {
        let tensor = self.tensors.get(name)?;
        self.read.borrow_mut().insert(name.to_owned());
        Some(tensor.to_device(self.device).to_kind(self.kind))
    }

    /// Whether the checkpoint has `name`, to find which optional blocks a model has; this does
    /// not read it.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A convolution's weight: plain, or folded (g · v / ‖v‖) from its weight-norm parts under
    /// either name PyTorch gives them.
    pub fn conv_weight(&self, prefix: &str) -> Result<Tensor, LoadError> {
        let plain = format!("{prefix}.weight");
        if !self.has(&plain) {
            let parts = [
                ("weight_g", "weight_v"),
                (
                    "parametrizations.weight.original0",
                    "parametrizations.weight.original1",
                ),
            ];
            for (g, v) in parts {
                let (g, v) = (format!("{prefix}.{g}"), format!("{prefix}.{v}"));
                if self.has(&g) && self.has(&v) {
                    let (g, v) = (self.get(&g)?, self.get(&v)?);
                    let dims: Vec<i64> = (1..v.dim() as i64).collect();
                    let norm = v.norm_scalaropt_dim(2, dims.as_slice(), true);
                    return Ok(v * (g / norm));
                }
            }
        }
        self.get(&plain)
    }

    /// Ends loading: a tensor the model did not read is an error naming it, unless its name
    /// matches one of `unread` (where `*` stands for any run of characters), the names an
    /// architecture documents as legitimately unread.
    pub fn finish(self, unread: &[&str]) -> Result<(), LoadError> {
        let read = self.read.into_inner();
        let unexpected: BTreeSet<&String> = self
            .tensors
            .keys()
            .filter(|name| !read.contains(*name))
            .filter(|name| !unread.iter().any(|pattern| matches(pattern, name)))
            .collect();
        if unexpected.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = unexpected
            .iter()
            .take(NAMES_SHOWN)
            .map(|s| s.as_str())
            .collect();
        let more = match unexpected.len().saturating_sub(NAMES_SHOWN) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        Err(LoadError::Invalid {
            path: self.path,
            message: format!(
                "tensors the model does not read (misnamed, or not of this architecture): {}{more}",
                shown.join(", ")
            ),
        })
    }
}

/// Whether `name` matches `pattern`, in which `*` stands for any run of characters.
fn matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => name.strip_prefix(head).is_some_and(|tail| {
            tail.char_indices()
                .map(|(i, _)| i)
                .chain([tail.len()])
                .any(|i| matches(rest, &tail[i..]))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn a_star_stands_for_any_run_of_characters() {
        assert!(matches("lm_head.weight", "lm_head.weight"));
        assert!(!matches("lm_head.weight", "lm_head.weight2"));
        assert!(matches(
            "*embeddings.position_ids",
            "bert.embeddings.position_ids"
        ));
        assert!(matches(
            "*embeddings.position_ids",
            "embeddings.position_ids"
        ));
        assert!(matches(
            "*.rotary_emb.inv_freq",
            "model.layers.3.self_attn.rotary_emb.inv_freq"
        ));
        assert!(matches("encoder.*", "encoder.conv_in.weight"));
        assert!(!matches("encoder.*", "decoder.encoder.weight"));
        assert!(!matches("*.position_ids", "position_ids_scale"));
    }
}
