//! The model-thread half of `translation`: MarianMT, with the requests queued meanwhile
//! translated together.

use std::path::Path;

use tch::{Device, Kind};

use crate::decode::beam::{Search, translate};
use crate::error::BackendError;
use crate::executor::{Backend, Shape, Wanted, Work};
use crate::models::LoadError;
use crate::models::marian::MarianModel;

/// One request's sources (token ids) and how to search their translations.
#[derive(Debug, Clone)]
pub struct Job {
    pub sources: Vec<Vec<i64>>,
    pub search: Search,
}

/// A pass holds up to `max_batch_requests` texts, each a row.
impl Work for Job {
    fn shape(&self) -> Shape {
        Shape {
            rows: self.sources.len(),
            width: 1,
        }
    }
}

/// The model thread's half.
#[derive(Debug)]
pub struct TranslationModel {
    model: MarianModel,
}

impl TranslationModel {
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<TranslationModel, LoadError> {
        Ok(TranslationModel {
            model: MarianModel::load(dir, device, kind)?,
        })
    }
}

impl Backend for TranslationModel {
    type Job = Job;
    type Output = Vec<Vec<i64>>;

    /// Translates the jobs queued together: jobs that search alike run as one batch.
    fn run_batch(
        &mut self,
        jobs: Vec<Job>,
        wanted: &Wanted<'_>,
    ) -> Vec<Result<Vec<Vec<i64>>, BackendError>> {
        let mut answers: Vec<Option<Result<Vec<Vec<i64>>, BackendError>>> =
            jobs.iter().map(|_| None).collect();
        let mut groups: Vec<(Search, Vec<usize>)> = Vec::new();
        for (index, Job { search, .. }) in jobs.iter().enumerate() {
            match groups
                .iter_mut()
                .find(|(s, _)| s.beams == search.beams && s.max_length == search.max_length)
            {
                Some((_, members)) => members.push(index),
                None => groups.push((*search, vec![index])),
            }
        }
        for (search, members) in groups {
            // A group whose clients all left is not translated.
            let members: Vec<usize> = members.into_iter().filter(|&i| wanted.still(i)).collect();
            let sources: Vec<Vec<i64>> = members
                .iter()
                .flat_map(|&i| jobs[i].sources.clone())
                .collect();
            let mut outputs = translate(&self.model, &sources, search).into_iter();
            for &i in &members {
                answers[i] = Some(Ok(outputs.by_ref().take(jobs[i].sources.len()).collect()));
            }
        }
        answers
            .into_iter()
            .map(|answer| answer.unwrap_or(Err(BackendError::Abandoned)))
            .collect()
    }
}
