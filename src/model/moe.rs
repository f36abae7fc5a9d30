//! The feed-forward block of a decoder layer: the dense SwiGLU MLP, or qwen3_next's sparse
//! mixture of experts as transformers' `Qwen3NextSparseMoeBlock` computes it.
//!
//! MoE: router softmax over `mlp.gate` logits, the top-k experts per token (probabilities
//! renormalised to sum to one when `norm_topk_prob`), each a SwiGLU MLP stored per expert
//! (`mlp.experts.{e}.{gate,up,down}_proj`), plus a shared expert scaled by
//! `sigmoid(shared_expert_gate(x))`. The choice of experts is made on the host (it is
//! discrete, and reading the probabilities back is a CPU–GPU sync point per MoE layer); the
//! routing weights stay on the graph, so the router trains as in PyTorch.
//! Each expert runs only on the tokens routed to it. In bf16 the router softmax and the
//! renormalisation are f32 and the routing weights are then rounded to the model dtype.
//!
//! Cost note: burn's backward of `select` / `narrow` allocates a gradient the size of the whole
//! source tensor, so each expert's slice of the routing weights costs O(tokens · experts) in
//! backward — O(tokens · experts²) per layer. Negligible for the handful of experts of the
//! fixtures; for a 512-expert checkpoint (Qwen3-Next-80B) a gather of all routed pairs at once
//! would be needed. The operator's qwen3_5 27B is dense.

use burn::module::Module;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};

use super::config::ModelConfig;
use super::llama::{swiglu, Linear, Mlp};
use super::weights::{TensorSource, WeightError};

/// `mlp.*` of one layer: exactly one of the dense MLP or the sparse MoE is present.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// Dense SwiGLU (`mlp.{gate,up,down}_proj`), all three or none.
    pub gate_proj: Option<Linear>,
    pub up_proj: Option<Linear>,
    pub down_proj: Option<Linear>,
    /// Router, `[experts, hidden]` (`mlp.gate.weight`).
    pub gate: Option<Linear>,
    pub experts: Vec<Mlp>,
    pub shared_expert: Option<Mlp>,
    /// `[1, hidden]`
    pub shared_expert_gate: Option<Linear>,
    /// Experts per token and whether their weights are renormalised.
    #[module(skip)]
    pub routing: (usize, bool),
}

impl FeedForward {
    /// Loads `prefix` (`model.layers.N.mlp`), dense or sparse as the config says for `layer`.
    pub fn load(
        src: &mut dyn TensorSource,
        prefix: &str,
        cfg: &ModelConfig,
        layer: usize,
    ) -> Result<Self, WeightError> {
        let h = cfg.hidden_size;
        let mlp = |src: &mut dyn TensorSource, p: &str, inner: usize| -> Result<Mlp, WeightError> {
            Ok(Mlp {
                gate_proj: Linear::load(src, &format!("{p}.gate_proj"), inner, h, cfg.mlp_bias)?,
                up_proj: Linear::load(src, &format!("{p}.up_proj"), inner, h, cfg.mlp_bias)?,
                down_proj: Linear::load(src, &format!("{p}.down_proj"), h, inner, cfg.mlp_bias)?,
            })
        };
        match &cfg.moe {
            Some(moe) if moe.sparse_layers[layer] => Ok(FeedForward {
                gate_proj: None,
                up_proj: None,
                down_proj: None,
                gate: Some(Linear::load(
                    src,
                    &format!("{prefix}.gate"),
                    moe.num_experts,
                    h,
                    false,
                )?),
                experts: (0..moe.num_experts)
                    .map(|e| {
                        mlp(
                            src,
                            &format!("{prefix}.experts.{e}"),
                            moe.expert_intermediate_size,
                        )
                    })
                    .collect::<Result<_, _>>()?,
                shared_expert: Some(mlp(
                    src,
                    &format!("{prefix}.shared_expert"),
                    moe.shared_expert_intermediate_size,
                )?),
                shared_expert_gate: Some(Linear::load(
                    src,
                    &format!("{prefix}.shared_expert_gate"),
                    1,
                    h,
                    false,
                )?),
                routing: (moe.top_k, moe.norm_topk_prob),
            }),
            _ => {
                let dense = mlp(src, prefix, cfg.intermediate_size)?;
                Ok(FeedForward {
                    gate_proj: Some(dense.gate_proj),
                    up_proj: Some(dense.up_proj),
                    down_proj: Some(dense.down_proj),
                    gate: None,
                    experts: Vec::new(),
                    shared_expert: None,
                    shared_expert_gate: None,
                    routing: (0, false),
                })
            }
        }
    }

    /// # Shapes
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        if let (Some(gate), Some(up), Some(down)) =
            (&self.gate_proj, &self.up_proj, &self.down_proj)
        {
            return swiglu(gate, up, down, x);
        }
        let [batch, seq, hidden] = x.dims();
        let tokens = batch * seq;
        let device = x.device();
        let router = self.gate.as_ref().expect("a sparse block has a router");
        // The router's softmax and renormalisation are f32 (transformers: `softmax(..,
        // dtype=torch.float)`), its weights then rounded to the model dtype.
        let dtype = x.dtype();
        let probs = softmax(router.forward(x.clone()).cast(DType::F32), 2)
            .reshape([tokens, self.experts.len()]);
        let (top_k, renormalise) = self.routing;
        let experts = self.experts.len();
        let host: Vec<f32> = probs
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 router probabilities");
        let mut chosen = vec![0.0f32; tokens * experts];
        let mut routed: Vec<Vec<i64>> = vec![Vec::new(); experts];
        for t in 0..tokens {
            let row = &host[t * experts..(t + 1) * experts];
            let mut order: Vec<usize> = (0..experts).collect();
            // Highest probability first; ties to the lower index, as torch.topk does.
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
            for &e in &order[..top_k] {
                chosen[t * experts + e] = 1.0;
                routed[e].push(t as i64);
            }
        }
        let chosen = Tensor::<2>::from_data(TensorData::new(chosen, [tokens, experts]), &device);
        let mut weights = probs * chosen;
        if renormalise {
            weights = weights.clone() / weights.sum_dim(1);
        }
        let weights = weights.cast(dtype);
        let flat = x.clone().reshape([tokens, hidden]);
        let mut out = Tensor::<2>::zeros([tokens, hidden], (&device, dtype));
        for (e, idx) in routed.into_iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            let n = idx.len();
            let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [n]), &device);
            let input = flat.clone().select(0, idx.clone()).reshape([1, n, hidden]);
            let y = self.experts[e].forward(input).reshape([n, hidden]);
            let w = weights.clone().select(0, idx.clone()).narrow(1, e, 1);
            out = out.select_assign(0, idx, y * w, IndexingUpdateOp::Add);
        }
        let out = out.reshape([batch, seq, hidden]);
        let shared = self
            .shared_expert
            .as_ref()
            .expect("a sparse block has a shared expert");
        let scale = sigmoid(
            self.shared_expert_gate
                .as_ref()
                .expect("a sparse block has a shared-expert gate")
                .forward(x.clone()),
        );
        out + shared.forward(x) * scale
    }
}
