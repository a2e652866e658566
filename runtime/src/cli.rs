//! Command-line argument groups that mean the same in both binaries (`mekd` and `mekd-edge`),
//! declared once.

use crate::data::preprocess::Normalisation;
use crate::protocol::API_KEY_ENV;

/// `--mean`/`--std` for models that carry no normalisation metadata.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct NormArgs {
    /// Per-channel mean on [0, 1] pixels, for a model without normalisation metadata.
    #[arg(long, value_delimiter = ',', requires = "std")]
    pub mean: Option<Vec<f32>>,
    /// Per-channel std on [0, 1] pixels, for a model without normalisation metadata.
    #[arg(long, value_delimiter = ',', requires = "mean")]
    pub std: Option<Vec<f32>>,
}

impl NormArgs {
    /// The normalisation given on the command line, if any.
    pub fn get(self) -> Option<Normalisation> {
        self.mean.zip(self.std).map(|(mean, std)| Normalisation { mean, std })
    }
}

/// The API key for an HTTP teacher.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ApiKeyArgs {
    /// API key for --teacher (prefer the environment variable: a command line is visible to
    /// other local users).
    #[arg(long, env = API_KEY_ENV, hide_env_values = true)]
    pub api_key: Option<String>,
}

impl ApiKeyArgs {
    /// The key, or a clear error naming both ways to give it.
    pub fn require(&self) -> anyhow::Result<String> {
        self.api_key.clone().ok_or_else(|| anyhow::anyhow!("--teacher needs --api-key KEY (or {API_KEY_ENV})"))
    }
}
