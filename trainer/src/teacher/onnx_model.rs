//! A teacher served by ONNX Runtime: the session (`mekd_runtime::onnxruntime`) and what serving
//! it needs.

use std::path::Path;

use mekd_contract::Normalisation;
use mekd_contract::protocol::{ResponseMode, TeacherInfo};
use mekd_runtime::onnxruntime::{OrtClassifier, OrtError};

/// An ONNX image classifier opened with ONNX Runtime to serve as a teacher (`mekd teacher
/// serve`, `mekd distill --teacher-onnx`), with what serving it needs, learnt once: the input
/// shape, class names and normalisation (the given one, else the model's metadata) from the
/// file, and the class count from its answer to a blank image (a model may leave it dynamic).
pub struct OrtTeacherModel {
    /// The session.
    pub session: OrtClassifier,
    /// `[C, H, W]` of one image.
    pub input_shape: [usize; 3],
    /// Scores per image.
    pub num_classes: usize,
    /// Class names from the metadata, if any.
    pub class_names: Option<Vec<String>>,
    /// How pixels become its input.
    pub norm: Normalisation,
}

impl OrtTeacherModel {
    /// Open `path` with the library at `library` (or found as [`mekd_runtime::onnxruntime::locate_library`] says).
    pub fn open(path: &Path, given: Option<Normalisation>, library: Option<&Path>) -> Result<Self, OrtError> {
        let (session, info) = OrtClassifier::open_classifier(path, library)?;
        let norm = Normalisation::choose(given, info.normalisation.as_ref(), info.input_shape[0], path)?;
        Ok(Self {
            session,
            input_shape: info.input_shape,
            num_classes: info.num_classes,
            class_names: info.class_names,
            norm,
        })
    }

    /// What a teacher serving this model answering in `response` mode, `max_batch` images per
    /// request, says of itself.
    pub fn teacher_info(&self, response: ResponseMode, max_batch: usize) -> TeacherInfo {
        TeacherInfo {
            input_shape: self.input_shape,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            response,
            mean: self.norm.mean.clone(),
            std: self.norm.std.clone(),
            max_batch,
        }
    }
}
