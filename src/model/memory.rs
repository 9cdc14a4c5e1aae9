//! Exact GPU memory accounting for training (and for inference, `pals eval`: no
//! gradients, no Adam state, forward-only buffers) the encoder on one (batch, seq) bucket,
//! without a GPU: the sizes come from the same (name, shape) lists that allocate the
//! buffers (`param_shapes`, `Activations::plan`, `BatchInputs::plan`, and for multi-task
//! training `task_param_shapes` and `TaskActivations::plan`).

use super::bert::{Activations, BatchInputs, half_storage};
use super::blocks::Planned;
use super::tasks::{Bucket, Method, TaskActivations, TaskSpec, task_param_shapes};
use super::{BertConfig, param_shapes};
use crate::contract::AttentionShape;
use crate::gpu::ElementType;
use crate::kernels::attention;

/// Bytes an f32 tensor of `shape` occupies.
pub fn tensor_bytes(shape: &[usize]) -> u64 {
    typed_bytes(shape, ElementType::F32)
}

/// Bytes a tensor of `shape` and `dtype` occupies, as `Gpu::zeros_of` sizes it: rounded up
/// to whole 4-byte words, and never less than one word (an empty tensor still owns one
/// element so that it can be bound).
pub fn typed_bytes(shape: &[usize], dtype: ElementType) -> u64 {
    ((dtype.size() * shape.iter().product::<usize>()).next_multiple_of(4) as u64).max(4)
}

fn total(list: &[(String, Vec<usize>)]) -> u64 {
    list.iter().map(|(_, shape)| tensor_bytes(shape)).sum()
}

fn planned_total(list: &[Planned]) -> u64 {
    list.iter().map(|(_, shape, dtype)| typed_bytes(shape, *dtype)).sum()
}

/// The byte counts of one training configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryPlan {
    pub parameters: u64,
    pub gradients: u64,
    /// Adam's first and second moments: twice the parameters.
    pub adam: u64,
    /// Everything in `Activations`: kept forward results and shared scratch.
    pub activations: u64,
    /// Everything in `BatchInputs`: ids, types, mask and segment plans.
    pub inputs: u64,
    /// Mixed precision's f16 copies of the encoder's big Linear weights (0 in f32).
    pub f16_weights: u64,
}

impl MemoryPlan {
    /// f32 training.
    pub fn new(config: &BertConfig, batch: usize, seq: usize) -> MemoryPlan {
        MemoryPlan::training(config, batch, seq, false)
    }

    /// Training in f32, or in mixed precision (`mixed`): f32 master weights, gradients and
    /// Adam state, plus f16 weight copies, with q, k, v and the FFN's intermediates in f16.
    pub fn training(config: &BertConfig, batch: usize, seq: usize, mixed: bool) -> MemoryPlan {
        let parameters = total(&param_shapes(config));
        MemoryPlan {
            parameters,
            gradients: parameters,
            adam: 2 * parameters,
            activations: planned_total(&Activations::plan_for(config, batch, seq, true, half_storage(mixed))),
            inputs: planned_total(&BatchInputs::plan(config, batch, seq)),
            f16_weights: if mixed { f16_weight_copy_bytes(config) } else { 0 },
        }
    }

    /// The same bucket for inference (f32): parameters, forward-only buffers and inputs.
    pub fn inference(config: &BertConfig, batch: usize, seq: usize) -> MemoryPlan {
        MemoryPlan {
            gradients: 0,
            adam: 0,
            activations: planned_total(&Activations::plan_for(config, batch, seq, false, ElementType::F32)),
            ..MemoryPlan::new(config, batch, seq)
        }
    }

    pub fn total(&self) -> u64 {
        self.parameters + self.gradients + self.adam + self.activations + self.inputs + self.f16_weights
    }
}

fn mib(bytes: u64) -> String {
    format!("{:10.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Activation buffers grouped by name with the layer index taken out, largest first:
/// (name, count, bytes of all of them).
fn activation_groups(
    config: &BertConfig,
    batch: usize,
    seq: usize,
    mixed: bool,
) -> Vec<(String, usize, u64)> {
    let mut groups: Vec<(String, usize, u64)> = Vec::new();
    for (name, shape, dtype) in Activations::plan_for(config, batch, seq, true, half_storage(mixed)) {
        let bytes = typed_bytes(&shape, dtype);
        let key: String = name
            .split('.')
            .map(|part| if part.chars().all(|c| c.is_ascii_digit()) { "*" } else { part })
            .collect::<Vec<_>>()
            .join(".");
        match groups.iter_mut().find(|(k, _, _)| *k == key) {
            Some(group) => {
                group.1 += 1;
                group.2 += bytes;
            }
            None => groups.push((key, 1, bytes)),
        }
    }
    groups.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    groups
}

/// A printable breakdown: totals per kind, then the activation buffers by name.
/// Mixed precision's f16 copies of each encoder layer's Q, K, V, attention-output and FFN
/// weights (`Bert::use_f16_weights`): 2 bytes per weight.
pub fn f16_weight_copy_bytes(c: &BertConfig) -> u64 {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    c.num_hidden_layers as u64 * (4 * h * h + 2 * h * i) * 2
}

/// `mixed`: training in mixed precision (the eval column is f32 inference either way).
pub fn memory_report(config: &BertConfig, batch: usize, seq: usize, mixed: bool) -> Vec<String> {
    let (plan, eval) =
        (MemoryPlan::training(config, batch, seq, mixed), MemoryPlan::inference(config, batch, seq));
    let row = |name: &str, train: u64, eval: u64| format!("  {name:12} {} {}", mib(train), mib(eval));
    let precision = if mixed { "mixed precision" } else { "f32" };
    let mut lines = vec![
        format!(
            "GPU memory: {} layers x {} hidden, batch {batch} x seq {seq}, {precision}     training           eval",
            config.num_hidden_layers, config.hidden_size
        ),
        row("parameters", plan.parameters, eval.parameters),
        row("gradients", plan.gradients, eval.gradients),
        row("Adam m and v", plan.adam, eval.adam),
        row("activations", plan.activations, eval.activations),
        row("inputs", plan.inputs, eval.inputs),
    ];
    if mixed {
        lines.push(row("f16 weights", plan.f16_weights, eval.f16_weights));
    }
    lines.push(row("total", plan.total(), eval.total()));
    // The unfused attention path's score matrices (CPU adapters), shared by every layer
    // and kept by the device, not the model: on top of the total where that path runs.
    let shape = AttentionShape { batch, seq, heads: config.num_attention_heads, head_dim: config.head_dim() };
    let limit = attention::CPU_WORKSPACE_BYTES;
    let (train, eval) =
        (attention::workspace_bytes(shape, true, limit), attention::workspace_bytes(shape, false, limit));
    lines.push(format!(
        "{} (unfused attention's workspace on a CPU adapter, where that path runs)",
        row("+ attention", train, eval)
    ));
    lines.push("  training activations by buffer (count x shape class):".to_string());
    for (name, count, bytes) in activation_groups(config, batch, seq, mixed) {
        lines.push(format!("    {name:24} x{count:<3} {}", mib(bytes)));
    }
    lines
}

/// What multi-task training adds to `MemoryPlan`: every task's own parameters (with
/// their gradients and Adam moments) and the activations of the terms and heads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskMemoryPlan {
    pub parameters: u64,
    pub gradients: u64,
    pub adam: u64,
    pub activations: u64,
}

impl TaskMemoryPlan {
    pub fn new(
        c: &BertConfig,
        method: &Method,
        tasks: &[TaskSpec],
        batch: usize,
        seq: usize,
    ) -> TaskMemoryPlan {
        let parameters: u64 = tasks.iter().map(|t| total(&task_param_shapes(c, method, t))).sum();
        let max_labels = tasks.iter().map(|t| t.num_labels).max().unwrap_or(1);
        TaskMemoryPlan {
            parameters,
            gradients: parameters,
            adam: 2 * parameters,
            activations: planned_total(&TaskActivations::plan(c, method, max_labels, batch, seq)),
        }
    }

    /// The same for inference: parameters and forward-only buffers.
    pub fn inference(
        c: &BertConfig,
        method: &Method,
        tasks: &[TaskSpec],
        batch: usize,
        seq: usize,
    ) -> TaskMemoryPlan {
        let max_labels = tasks.iter().map(|t| t.num_labels).max().unwrap_or(1);
        let bucket = Bucket { batch, seq, training: false };
        TaskMemoryPlan {
            gradients: 0,
            adam: 0,
            activations: planned_total(&TaskActivations::plan_for(c, method, max_labels, bucket)),
            ..TaskMemoryPlan::new(c, method, tasks, batch, seq)
        }
    }

    pub fn total(&self) -> u64 {
        self.parameters + self.gradients + self.adam + self.activations
    }
}

/// The task-specific lines that follow `memory_report` for a multi-task model.
pub fn task_memory_report(
    c: &BertConfig,
    method: &Method,
    tasks: &[TaskSpec],
    batch: usize,
    seq: usize,
) -> Vec<String> {
    let plan = TaskMemoryPlan::new(c, method, tasks, batch, seq);
    let eval = TaskMemoryPlan::inference(c, method, tasks, batch, seq);
    let (encoder, encoder_eval) =
        (MemoryPlan::new(c, batch, seq).total(), MemoryPlan::inference(c, batch, seq).total());
    let row = |name: &str, train: u64, eval: u64| format!("  {name:12} {} {}", mib(train), mib(eval));
    vec![
        format!("task-specific ({}, {} task(s)):", method.name(), tasks.len()),
        row("parameters", plan.parameters, eval.parameters),
        row("gradients", plan.gradients, eval.gradients),
        row("Adam m and v", plan.adam, eval.adam),
        row("activations", plan.activations, eval.activations),
        row("total", plan.total(), eval.total()),
        format!(
            "encoder + task-specific {} {}",
            mib(encoder + plan.total()),
            mib(encoder_eval + eval.total())
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_match_the_parameter_count() {
        let c = BertConfig::base();
        let plan = MemoryPlan::new(&c, 32, 128);
        assert_eq!(plan.parameters, 4 * super::super::param_count(&c) as u64);
        assert_eq!(plan.adam, 2 * plan.parameters);
    }

    #[test]
    fn report_lists_every_activation_byte() {
        let c = BertConfig::tiny(2, 32, 4);
        for mixed in [false, true] {
            let plan = MemoryPlan::training(&c, 3, 7, mixed);
            let grouped: u64 = activation_groups(&c, 3, 7, mixed).iter().map(|g| g.2).sum();
            assert_eq!(grouped, plan.activations);
            let report = memory_report(&c, 3, 7, mixed);
            assert!(report.iter().any(|line| line.contains("layer.*.pre")), "{report:?}");
            assert_eq!(report.iter().any(|line| line.contains("f16 weights")), mixed, "{report:?}");
        }
        // Chunks of 4 sequences x 4 heads x 128 x 128 f32 scores: 1 MiB, twice for the
        // backward.
        let report = memory_report(&c, 32, 128, false);
        let workspace = report.iter().find(|line| line.contains("+ attention")).unwrap();
        assert!(workspace.contains("2.0 MiB") && workspace.contains("1.0 MiB"), "{workspace}");
    }

    #[test]
    fn task_plan_counts_each_tasks_parameters() {
        let c = BertConfig::tiny(2, 32, 4);
        let method = Method::default_for("pals", &c).unwrap();
        let one = TaskMemoryPlan::new(&c, &method, &[TaskSpec::new("a", 2)], 3, 7);
        let two = TaskMemoryPlan::new(&c, &method, &[TaskSpec::new("a", 2), TaskSpec::new("b", 2)], 3, 7);
        assert!(one.parameters > 0 && one.activations > 0);
        assert_eq!(two.parameters, 2 * one.parameters);
        assert_eq!(two.activations, one.activations);
        assert_eq!(one.adam, 2 * one.parameters);
    }
}
