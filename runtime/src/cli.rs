//! Command-line argument groups that mean the same in both binaries (`mekd` and `mekd-edge`),
//! declared once.

use std::path::PathBuf;

use mekd_contract::Normalisation;
use mekd_contract::protocol::API_KEY_ENV;

use crate::teacher_client::{HttpClient, V2_SCHEME_PREFIX, V2Options};

/// `--teacher URL` and how to reach it: its API key, how to read a v2 teacher, and the
/// certificate authority of an `https://` one.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct HttpTeacherArgs {
    /// The teacher over HTTP(S): this project's API (`mekd teacher serve`, e.g.
    /// http://127.0.0.1:8080) or a model served over the Open Inference Protocol by KServe,
    /// Triton, MLServer or `mekd teacher serve` (v2+http://HOST:PORT/v2/models/NAME; see the
    /// --teacher-* flags).
    #[arg(long, group = "teacher_source")]
    pub teacher: Option<String>,
    #[command(flatten)]
    pub key: ApiKeyArgs,
    #[command(flatten)]
    pub v2: V2Args,
    #[command(flatten)]
    pub ca_cert: CaCertArgs,
}

impl HttpTeacherArgs {
    /// A client of the teacher, if --teacher was given.
    pub fn client(&self) -> anyhow::Result<Option<HttpClient>> {
        let Some(url) = &self.teacher else { return Ok(None) };
        let mut client = HttpClient::new(url, &self.key.for_teacher(url)?)?.with_v2(self.v2.clone().options());
        if let Some(pem) = self.ca_cert.read()? {
            client = client.with_ca_cert(&pem)?;
        }
        Ok(Some(client))
    }
}

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
    /// The key for the teacher at `url`, or a clear error naming both ways to give it. This
    /// project's API always needs one; a v2 teacher (`v2+http...`) only if its server asks
    /// (without one, none is sent: the empty key).
    pub fn for_teacher(&self, url: &str) -> anyhow::Result<String> {
        match &self.api_key {
            Some(key) => Ok(key.clone()),
            None if url.starts_with(V2_SCHEME_PREFIX) => Ok(String::new()),
            None => anyhow::bail!("--teacher needs --api-key KEY (or {API_KEY_ENV})"),
        }
    }
}

/// How to read a teacher served over the Open Inference Protocol (`--teacher
/// v2+http://host:port/v2/models/NAME`); ignored for this project's own API.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct V2Args {
    /// The output to read, when the v2 teacher has several.
    #[arg(long)]
    pub teacher_output: Option<String>,
    /// The v2 teacher's output holds probabilities, not logits (read as log-probabilities).
    #[arg(long)]
    pub teacher_probabilities: bool,
    /// Per-channel mean on [0, 1] pixels, for a v2 teacher that takes FP32 tensors (a UINT8
    /// teacher gets the pixels as they are).
    #[arg(long, value_delimiter = ',', requires = "teacher_std")]
    pub teacher_mean: Option<Vec<f32>>,
    /// Per-channel std on [0, 1] pixels, for a v2 teacher that takes FP32 tensors.
    #[arg(long, value_delimiter = ',', requires = "teacher_mean")]
    pub teacher_std: Option<Vec<f32>>,
}

impl V2Args {
    /// The options these flags give.
    pub fn options(self) -> V2Options {
        V2Options {
            norm: self.teacher_mean.zip(self.teacher_std).map(|(mean, std)| Normalisation { mean, std }),
            output: self.teacher_output,
            probabilities: self.teacher_probabilities,
        }
    }
}

/// `--ca-cert` for an `https://` teacher whose certificate a private CA signed.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CaCertArgs {
    /// Trust only the certificate authorities in this PEM file for an https:// teacher,
    /// instead of the system's (a private CA, a self-signed server).
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
}

impl CaCertArgs {
    /// The PEM file's bytes, if one was given.
    pub fn read(&self) -> anyhow::Result<Option<Vec<u8>>> {
        use anyhow::Context;
        self.ca_cert
            .as_ref()
            .map(|path| std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display())))
            .transpose()
    }
}
