//! Checkpoints: everything a resumed run needs to continue exactly as an uninterrupted one.
//!
//! A checkpoint is a directory:
//! - `weights.safetensors`: the policy's vars by name, in their dtype;
//! - `optimizer.safetensors`: Adam's moments (f32, or bf16 with `moments: bf16`) (`m.<name>`, `v.<name>`) and f32 master weights
//!   (`master.<name>`) for vars that are not f32;
//! - `state.json`: format version, steps and updates done, the shuffling generator's state, the
//!   parameter names and the configuration that wrote it.
//!
//! It is written into `<dir>.partial` and renamed into place, so a run killed while saving
//! leaves the previous checkpoint whole.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::optim::Adam;
use crate::policy::Policy;
use crate::rng::Rng;
use crate::trainer::{TrainConfig, Trainer};
use crate::{Error, Result};

const FORMAT: u32 = 1;
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

#[derive(Debug, Serialize, Deserialize)]
struct State {
    format: u32,
    step: u64,
    updates: u64,
    rng: Rng,
    params: Vec<String>,
    config: TrainConfig,
}

impl Trainer {
    /// Writes a checkpoint of the policy weights and the trainer state to `dir`, replacing a
    /// checkpoint already there.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        self.write_checkpoint(dir, None)
    }

    /// [`Trainer::save_checkpoint`] with the weights taken from `weights`, a safetensors file
    /// that already holds exactly this trainer's vars by the same names (the policy checkpoint
    /// written beside it): hard-linked, or copied where links are not possible, instead of
    /// serialising the weights a second time.
    pub fn save_checkpoint_sharing(&self, dir: &Path, weights: &Path) -> Result<()> {
        self.write_checkpoint(dir, Some(weights))
    }

    fn write_checkpoint(&self, dir: &Path, weights_file: Option<&Path>) -> Result<()> {
        let partial = sibling(dir, "partial");
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| io(&partial, e))?;
        }
        fs::create_dir_all(&partial).map_err(|e| io(&partial, e))?;

        let weights_path = partial.join(WEIGHTS_FILE);
        match weights_file {
            Some(file) => {
                if fs::hard_link(file, &weights_path).is_err() {
                    fs::copy(file, &weights_path).map_err(|e| io(file, e))?;
                }
            }
            None => {
                let weights: HashMap<&str, Tensor> = self
                    .names
                    .iter()
                    .zip(&self.vars)
                    .map(|(n, v)| (n.as_str(), v.as_tensor().detach()))
                    .collect();
                candle_core::safetensors::save(&weights, &weights_path)?;
            }
        }

        let opt = &self.optimizer;
        let mut moments = HashMap::new();
        for (i, name) in self.names.iter().enumerate() {
            moments.insert(format!("m.{name}"), opt.m[i].clone());
            moments.insert(format!("v.{name}"), opt.v[i].clone());
            if let Some(w) = &opt.master[i] {
                moments.insert(format!("master.{name}"), w.clone());
            }
        }
        candle_core::safetensors::save(&moments, partial.join(OPTIMIZER_FILE))?;

        let state = State {
            format: FORMAT,
            step: self.step,
            updates: opt.t,
            rng: self.rng.clone(),
            params: self.names.clone(),
            config: self.cfg.clone(),
        };
        let json = serde_json::to_string_pretty(&state).map_err(|e| Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: format!("cannot serialise state: {e}"),
        })?;
        let state_path = partial.join(STATE_FILE);
        fs::write(&state_path, json).map_err(|e| io(&state_path, e))?;

        let old = sibling(dir, "old");
        if dir.exists() {
            if old.exists() {
                fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
            }
            fs::rename(dir, &old).map_err(|e| io(dir, e))?;
        }
        fs::rename(&partial, dir).map_err(|e| io(&partial, e))?;
        if old.exists() {
            fs::remove_dir_all(&old).map_err(|e| io(&old, e))?;
        }
        Ok(())
    }

    /// Builds a trainer from the checkpoint in `dir` and loads its weights into `policy`.
    /// `cfg` is the configuration to continue with; for a bit-identical continuation it must
    /// equal the one that wrote the checkpoint (kept in `state.json`).
    pub fn resume(cfg: TrainConfig, policy: &dyn Policy, dir: &Path) -> Result<Trainer> {
        let bad = |msg: String| Error::Checkpoint {
            path: dir.to_path_buf(),
            msg,
        };
        let state_path = dir.join(STATE_FILE);
        let text = fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
        let state: State = serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "{STATE_FILE} is not a spur-rl checkpoint state: {e}"
            ))
        })?;
        if state.format != FORMAT {
            return Err(bad(format!(
                "format {} is not the supported format {FORMAT}",
                state.format
            )));
        }
        let mut trainer = Trainer::new(cfg, policy)?;
        if state.params != trainer.names {
            return Err(bad(format!(
                "it holds {} parameters that do not match the policy's {} (different model?)",
                state.params.len(),
                trainer.names.len()
            )));
        }
        let device = policy.device();
        let weights = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &device)?;
        let moments = candle_core::safetensors::load(dir.join(OPTIMIZER_FILE), &device)?;
        let get = |map: &HashMap<String, Tensor>, file: &str, key: &str, like: &Tensor| {
            let t = map
                .get(key)
                .ok_or_else(|| bad(format!("{file} has no tensor `{key}`")))?;
            if t.dims() != like.dims() {
                return Err(bad(format!(
                    "{file}: `{key}` has shape {:?}, the model needs {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t.clone())
        };
        let opt: &mut Adam = &mut trainer.optimizer;
        for (i, (name, var)) in trainer.names.iter().zip(&trainer.vars).enumerate() {
            let w = get(&weights, WEIGHTS_FILE, name, var.as_tensor())?;
            var.set(&w.to_dtype(var.dtype())?)?;
            opt.m[i] = get(
                &moments,
                OPTIMIZER_FILE,
                &format!("m.{name}"),
                var.as_tensor(),
            )?
            .to_dtype(crate::optim::precision_dtype(opt.config().moments))?;
            opt.v[i] = get(
                &moments,
                OPTIMIZER_FILE,
                &format!("v.{name}"),
                var.as_tensor(),
            )?
            .to_dtype(crate::optim::precision_dtype(opt.config().moments))?;
            if opt.master[i].is_some() {
                let key = format!("master.{name}");
                opt.master[i] = Some(
                    get(&moments, OPTIMIZER_FILE, &key, var.as_tensor())?.to_dtype(DType::F32)?,
                );
            }
        }
        opt.t = state.updates;
        trainer.rng = state.rng;
        trainer.step = state.step;
        Ok(trainer)
    }
}

/// The configuration stored in the checkpoint at `dir`.
pub fn saved_config(dir: &Path) -> Result<TrainConfig> {
    let state_path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&state_path).map_err(|e| io(&state_path, e))?;
    let state: State = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("{STATE_FILE} is not a spur-rl checkpoint state: {e}"),
    })?;
    Ok(state.config)
}

fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
