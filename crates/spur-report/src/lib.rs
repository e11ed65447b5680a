//! The report of an experiment: a table by model × reward, plots, and one
//! self-contained `index.html`, from the experiment's run records.
//!
//! This crate reads nothing from the cache itself: the caller gathers each
//! run's record and a few of its eval responses into a [`ReportInput`], and
//! [`write_report`] turns that into files. A report directory appears whole
//! (it is written beside its destination and renamed into place).

mod html;
mod output;
mod plots;
mod probe_table;
mod runs;
mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use output::MARKER_FILE;

/// Everything a report is made from.
#[derive(Clone, Debug)]
pub struct ReportInput {
    pub experiment: ExperimentInfo,
    /// Every run of the grid, started or not, in grid order.
    pub runs: Vec<RunInput>,
}

#[derive(Clone, Debug)]
pub struct ExperimentInfo {
    pub name: String,
    pub path: String,
    /// sha256 of the experiment file's bytes.
    pub sha256: String,
    pub description: Option<String>,
}

/// One grid cell.
#[derive(Clone, Debug)]
pub struct RunInput {
    pub id: String,
    /// `axis=value,…`, as `spur status` prints it.
    pub label: String,
    pub model: String,
    pub reward: String,
    pub seed: String,
    /// The cell's other axes (`ablation=no_clip_term, gamma=0.3`); runs that
    /// differ only in seed share a row of the table and a line of each plot.
    pub variant: String,
    /// `None` for a run that was never started.
    pub record: Option<RecordFile>,
    /// Eval node id (hex) → eval name (`math500`, `aime24`…), for records
    /// whose nodes do not name their eval.
    pub eval_names: BTreeMap<String, String>,
    /// A few responses of the run's latest finished eval(s).
    pub samples: Vec<Sample>,
}

/// A run record as `spur run` writes it, and the file it was read from (`cache/runs/<id>.json`),
/// for error messages.
#[derive(Clone, Debug)]
pub struct RecordFile {
    pub path: PathBuf,
    pub record: spur_store::RunRecord,
}

/// One graded response of an eval node.
#[derive(Clone, Debug)]
pub struct Sample {
    pub eval: String,
    pub step: u64,
    pub problem: String,
    pub gold: String,
    pub extracted: String,
    pub correct: bool,
    pub response: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{path}: not a run record as `spur run` writes it: {problem}")]
    Record { path: PathBuf, problem: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} exists and is not a spur report (no {marker} in it); \
         remove it or choose another --out",
        marker = MARKER_FILE
    )]
    NotAReport { path: PathBuf },
    #[error("cannot draw {file}: {problem}")]
    Plot { file: String, problem: String },
    #[error("cannot render {file}: {source}")]
    Template {
        file: String,
        source: minijinja::Error,
    },
}

pub type Result<T> = std::result::Result<T, ReportError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What [`write_report`] wrote.
#[derive(Clone, Debug)]
pub struct Written {
    pub dir: PathBuf,
    /// Paths relative to `dir`, sorted.
    pub files: Vec<String>,
    pub runs_total: usize,
    pub runs_finished: usize,
    /// Runs with a record that are not finished (running, stopped, failed).
    pub runs_unfinished: usize,
    pub runs_not_started: usize,
    /// What the records held that the report left out, by run.
    pub warnings: Vec<String>,
}

/// Write the report of `input` into `dir`, replacing an earlier report
/// there (a directory holding [`MARKER_FILE`]); any other existing
/// directory is refused rather than overwritten.
pub fn write_report(input: &ReportInput, dir: &Path) -> Result<Written> {
    let mut views = input
        .runs
        .iter()
        .map(runs::RunView::parse)
        .collect::<Result<Vec<_>>>()?;
    runs::share_eval_metrics(&mut views);
    let table = table::Table::build(input, &views);
    let figures = plots::figures(input, &views);
    let files = output::replace_dir(dir, |tmp| {
        let mut files = vec![
            output::write_file(tmp, "table.md", table.markdown().as_bytes())?,
            output::write_file(tmp, "table.csv", table.csv().as_bytes())?,
        ];
        if !table.probe.is_empty() {
            let csv = probe_table::csv(&table.probe);
            files.push(output::write_file(tmp, "probe.csv", csv.as_bytes())?);
        }
        let mut drawn = Vec::with_capacity(figures.len());
        for fig in &figures {
            let d = plots::draw(fig)?;
            files.push(output::write_file(tmp, &d.png_file, &d.png)?);
            files.push(output::write_file(tmp, &d.svg_file, d.svg.as_bytes())?);
            drawn.push(d);
        }
        let page = html::render(input, &views, &table, &drawn)?;
        files.push(output::write_file(tmp, "index.html", page.as_bytes())?);
        files.sort();
        Ok(files)
    })?;
    let count = |s: runs::State| views.iter().filter(|v| v.state == s).count();
    Ok(Written {
        dir: dir.to_path_buf(),
        files,
        runs_total: views.len(),
        runs_finished: count(runs::State::Finished),
        runs_not_started: count(runs::State::NotStarted),
        runs_unfinished: views.len()
            - count(runs::State::Finished)
            - count(runs::State::NotStarted),
        warnings: input
            .runs
            .iter()
            .zip(&views)
            .flat_map(|(r, v)| {
                v.warnings
                    .iter()
                    .map(move |w| format!("run {}: {w}", r.label))
            })
            .collect(),
    })
}

/// A file or directory name made of `[A-Za-z0-9._-]` from a name in an
/// experiment file (which may hold `/`, `..` or anything else).
pub fn safe_file_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_start_matches('.');
    if s.is_empty() {
        "_".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod testdata;
