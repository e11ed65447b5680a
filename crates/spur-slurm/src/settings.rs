use serde::{Deserialize, Serialize};

use crate::SlurmError;

/// How a job asks for GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuOption {
    /// `--gres=gpu[:type]:N`, understood by every Slurm with GPUs configured as GRES.
    #[default]
    Gres,
    /// `--gpus=[type:]N`, the newer TRES-style request.
    Gpus,
}

/// Where and with what resources jobs run: the `executor:` block of an
/// experiment file, or a user's config. Every field is optional; an empty
/// block submits to the cluster's default partition with its defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSettings {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// In Slurm's `--time` format, e.g. `1-00:00:00` or `90` (minutes).
    pub time_limit: Option<String>,
    /// GPUs per job.
    pub gpus: Option<u32>,
    /// GPU type as the cluster names it (`a100`, `h100`...), if it has several.
    pub gpu_type: Option<String>,
    #[serde(default)]
    pub gpu_option: GpuOption,
    pub cpus_per_gpu: Option<u32>,
    /// In Slurm's memory format, e.g. `64G`.
    pub mem_per_gpu: Option<String>,
    /// More options passed to sbatch as they are, e.g. `--constraint=h100`.
    #[serde(default)]
    pub sbatch_options: Vec<String>,
}

/// Options that spur writes itself; setting them in `sbatch_options` would
/// break logs, checkpoint-and-requeue, dependencies or arrays.
const RESERVED_OPTIONS: &[&str] = &[
    "--output",
    "-o",
    "--error",
    "-e",
    "--open-mode",
    "--signal",
    "--requeue",
    "--no-requeue",
    "--dependency",
    "-d",
    "--kill-on-invalid-dep",
    "--array",
    "-a",
    "--job-name",
    "-J",
    "--chdir",
    "-D",
    "--parsable",
    "--wrap",
];

impl SlurmSettings {
    /// Checks what Slurm cannot check for us (a newline would inject lines into
    /// the job script) or would reject late with a less helpful message.
    pub fn validate(&self) -> Result<(), SlurmError> {
        let words = [
            ("partition", &self.partition),
            ("account", &self.account),
            ("qos", &self.qos),
            ("time_limit", &self.time_limit),
            ("gpu_type", &self.gpu_type),
            ("mem_per_gpu", &self.mem_per_gpu),
        ];
        for (key, value) in words {
            if let Some(value) = value {
                check_word(key, value)?;
            }
        }
        let has_gpus = self.gpus.is_some_and(|n| n > 0);
        if self.gpus == Some(0) {
            return Err(invalid("gpus", "is 0; leave it out for a job without GPUs"));
        }
        for (key, set) in [
            ("gpu_type", self.gpu_type.is_some()),
            ("cpus_per_gpu", self.cpus_per_gpu.is_some()),
            ("mem_per_gpu", self.mem_per_gpu.is_some()),
        ] {
            if set && !has_gpus {
                return Err(invalid(key, "needs `gpus` (the number of GPUs per job)"));
            }
        }
        if self.cpus_per_gpu == Some(0) {
            return Err(invalid("cpus_per_gpu", "must be at least 1"));
        }
        for option in &self.sbatch_options {
            check_extra_option(option)?;
        }
        Ok(())
    }

    /// The sbatch options these settings stand for, one per `#SBATCH` line.
    pub fn sbatch_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(p) = &self.partition {
            args.push(format!("--partition={p}"));
        }
        if let Some(a) = &self.account {
            args.push(format!("--account={a}"));
        }
        if let Some(q) = &self.qos {
            args.push(format!("--qos={q}"));
        }
        if let Some(t) = &self.time_limit {
            args.push(format!("--time={t}"));
        }
        if let Some(n) = self.gpus {
            let typed = match &self.gpu_type {
                Some(t) => format!("{t}:{n}"),
                None => n.to_string(),
            };
            args.push(match self.gpu_option {
                GpuOption::Gres => format!("--gres=gpu:{typed}"),
                GpuOption::Gpus => format!("--gpus={typed}"),
            });
        }
        if let Some(c) = self.cpus_per_gpu {
            args.push(format!("--cpus-per-gpu={c}"));
        }
        if let Some(m) = &self.mem_per_gpu {
            args.push(format!("--mem-per-gpu={m}"));
        }
        args.extend(self.sbatch_options.iter().cloned());
        args
    }
}

fn invalid(key: &str, reason: impl Into<String>) -> SlurmError {
    SlurmError::InvalidSetting {
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn check_word(key: &str, value: &str) -> Result<(), SlurmError> {
    if value.is_empty() {
        return Err(invalid(
            key,
            "is empty; leave it out to use the cluster's default",
        ));
    }
    if value
        .chars()
        .any(|c| c.is_whitespace() || c == '"' || c == '#')
    {
        return Err(invalid(
            key,
            format!("{value:?} contains whitespace, `\"` or `#`, which no Slurm value has"),
        ));
    }
    Ok(())
}

fn check_extra_option(option: &str) -> Result<(), SlurmError> {
    let key = "sbatch_options";
    if !option.starts_with('-') {
        return Err(invalid(
            key,
            format!("{option:?} is not an option; write it as `--name=value`"),
        ));
    }
    if option.contains(['\n', '\r', '"']) {
        return Err(invalid(
            key,
            format!("{option:?} contains a newline or `\"`"),
        ));
    }
    let name = option.split('=').next().unwrap_or(option);
    // Short options may carry their value glued on (`-o/path`).
    let reserved = RESERVED_OPTIONS.iter().find(|r| {
        name == **r || (r.len() == 2 && !name.starts_with("--") && name.starts_with(**r))
    });
    if let Some(r) = reserved {
        return Err(invalid(
            key,
            format!("{option:?} sets `{r}`, which spur sets itself for logs, requeueing, dependencies and arrays; remove it"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_json(text: &str) -> Result<SlurmSettings, serde_json::Error> {
        serde_json::from_str(text)
    }

    #[test]
    fn gres_and_gpus_requests() {
        let mut s = SlurmSettings {
            gpus: Some(8),
            gpu_type: Some("h100".into()),
            cpus_per_gpu: Some(12),
            mem_per_gpu: Some("80G".into()),
            ..Default::default()
        };
        s.validate().unwrap();
        assert_eq!(
            s.sbatch_args(),
            [
                "--gres=gpu:h100:8",
                "--cpus-per-gpu=12",
                "--mem-per-gpu=80G"
            ]
        );
        s.gpu_option = GpuOption::Gpus;
        s.gpu_type = None;
        assert_eq!(s.sbatch_args()[0], "--gpus=8");
    }

    #[test]
    fn deserialises_and_rejects_unknown_keys() {
        let s = from_json(
            r#"{"partition": "gpu", "time_limit": "1-00:00:00", "gpus": 4,
                "gpu_option": "gpus", "sbatch_options": ["--constraint=a100"]}"#,
        )
        .unwrap();
        assert_eq!(s.gpu_option, GpuOption::Gpus);
        assert_eq!(
            s.sbatch_args(),
            [
                "--partition=gpu",
                "--time=1-00:00:00",
                "--gpus=4",
                "--constraint=a100"
            ]
        );
        let err = from_json(r#"{"partion": "gpu"}"#).unwrap_err().to_string();
        assert!(err.contains("unknown field `partion`"), "{err}");
        assert!(from_json(r#"{"gpu_option": "mig"}"#).is_err());
    }

    #[test]
    fn validation_names_the_key() {
        let cases = [
            (r#"{"partition": "gpu\n#SBATCH --x"}"#, "partition"),
            (r#"{"account": ""}"#, "account"),
            (r#"{"cpus_per_gpu": 4}"#, "cpus_per_gpu"),
            (r#"{"gpus": 0}"#, "gpus"),
            (
                r#"{"sbatch_options": ["--output=/tmp/x"]}"#,
                "sbatch_options",
            ),
            (r#"{"sbatch_options": ["-o/tmp/x"]}"#, "sbatch_options"),
            (
                r#"{"sbatch_options": ["constraint=a100"]}"#,
                "sbatch_options",
            ),
        ];
        for (json, key) in cases {
            let err = from_json(json).unwrap().validate().unwrap_err();
            match err {
                SlurmError::InvalidSetting { key: k, .. } => assert_eq!(k, key, "{json}"),
                other => panic!("{json}: {other}"),
            }
        }
        // A short option that merely starts like a reserved one is fine.
        let ok = from_json(r#"{"sbatch_options": ["--exclusive", "-N1"]}"#).unwrap();
        ok.validate().unwrap();
    }
}
