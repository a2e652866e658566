//! `mekd report`: the comparison table of finished runs.

use std::path::PathBuf;

use anyhow::Result;
use mekd_trainer::report;

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Run directories, or folders holding them.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Print the rows as a JSON array instead of the markdown table.
    #[arg(long)]
    json: bool,
    /// One row per run instead of one per configuration (over seeds).
    #[arg(long)]
    per_run: bool,
    /// Also write report.md, report.json and accuracy.svg into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

impl ReportArgs {
    pub fn run(self) -> Result<()> {
        let runs = report::collect_runs(&self.dirs)?;
        let rows = if self.per_run {
            runs.iter().flat_map(|run| report::aggregate(std::slice::from_ref(run))).collect()
        } else {
            report::aggregate(&runs)
        };
        if let Some(out) = &self.out {
            report::write(out, &rows, &runs)?;
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print!("{}", report::markdown(&rows));
        }
        Ok(())
    }
}
