//! Counting trainable parameters the way PyTorch's `sum(p.numel() for p in parameters())`
//! does: burn's `num_params` also counts BatchNorm running statistics (buffers in PyTorch).

use std::collections::HashSet;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

/// Visitor that lists a module's float tensors: id, size, and whether it is a BatchNorm running
/// statistic (a `running_*` field) rather than a trainable parameter.
#[derive(Default)]
struct FloatTensors {
    path: Vec<String>,
    found: Vec<(ParamId, usize, bool)>,
}

impl ModuleVisitor for FloatTensors {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let running = self.path.last().is_some_and(|name| name.starts_with("running_"));
        self.found.push((param.id, param.lazy_shape().num_elements(), running));
    }
}

fn float_tensors<M: Module>(module: &M) -> Vec<(ParamId, usize, bool)> {
    let mut visitor = FloatTensors::default();
    module.visit(&mut visitor);
    visitor.found
}

/// Visitor that reads every float tensor (which initialises a lazily initialised one).
struct Initialise;

impl ModuleVisitor for Initialise {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        drop(param.val());
    }
}

/// Draw the initial values of every lazily initialised tensor of `module` now, in visiting
/// order. burn draws a parameter's initial values when it is first read, so without this the
/// values depend on which computation reads the parameters first (and on any draws made before).
pub fn initialise<M: Module>(module: &M) {
    module.visit(&mut Initialise);
}

/// Trainable parameters of `module` (BatchNorm running statistics excluded).
pub fn trainable_params<M: Module>(module: &M) -> usize {
    float_tensors(module).into_iter().filter(|&(_, _, running)| !running).map(|(_, n, _)| n).sum()
}

/// The ids of `module`'s BatchNorm running statistics: the float tensors it holds that do not
/// train.
pub fn running_statistics<M: Module>(module: &M) -> HashSet<ParamId> {
    float_tensors(module).into_iter().filter(|&(_, _, running)| running).map(|(id, _, _)| id).collect()
}
