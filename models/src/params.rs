//! Counting trainable parameters the way PyTorch's `sum(p.numel() for p in parameters())`
//! does: burn's `num_params` also counts BatchNorm running statistics (buffers in PyTorch).

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// Visitor that sums float parameter sizes outside `running_*` fields.
#[derive(Default)]
struct TrainableCounter {
    path: Vec<String>,
    count: usize,
}

impl ModuleVisitor for TrainableCounter {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.path.last().is_some_and(|name| name.starts_with("running_")) {
            self.count += param.lazy_shape().num_elements();
        }
    }
}

/// Trainable parameters of `module` (BatchNorm running statistics excluded).
pub fn trainable_params<M: Module>(module: &M) -> usize {
    let mut counter = TrainableCounter::default();
    module.visit(&mut counter);
    counter.count
}
