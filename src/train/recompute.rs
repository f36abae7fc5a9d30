//! Gradients without the whole graph: per-layer recompute and a chunked LM head.
//!
//! The plain path ([`crate::model::logprobs::logprobs`] on autodiff weights, then
//! `loss.backward()`) keeps every activation of every layer for backward, and the
//! `[tokens × vocab]` logits with their log-softmax. For a 27B model at 4k tokens that is
//! ~124 GB of activations and 4 GB per copy of the logits. This module computes the same
//! gradients in segments, each one's forward run again during backward:
//!
//! - **head** — final norm, vocabulary projection, log-softmax and gather, `logits_chunk`
//!   target positions at a time: forward keeps only the per-token log-probs; backward
//!   recomputes one chunk's logits, back-propagates it, and drops it;
//! - **layers** (with `recompute`) — forward keeps only each decoder layer's input; backward
//!   recomputes one layer with a graph from its kept input, back-propagates the incoming
//!   gradient through it, and drops it (PyTorch's `torch.utils.checkpoint` per block, as
//!   transformers' `gradient_checkpointing_enable()` wraps each decoder layer). Without
//!   `recompute` the layers keep their graph as in the plain path and only the head is
//!   segmented;
//! - **embedding** — the gather's gradient, scattered into the embedding weight.
//!
//! Each segment's backward is the backward of `sum(output ⊙ g)` with `g` the gradient that
//! reached its output (a constant): its gradients are exactly `Jᵀ g`, the chain rule applied
//! by hand at segment boundaries. Parameter gradients from every segment (the tied embedding
//! gets two) are summed into one [`GradientsParams`], so clipping and the optimizer are the
//! plain path's. The only numerical difference is the order of some f32 sums.
//!
//! The loss itself is not recomputed: [`Segmented::forward`] returns the log-probs as a leaf
//! that requires grad, the caller builds the loss on it (SFT, DPO, both) and back-propagates
//! that small graph, and hands the leaf's gradient to [`Segmented::backward`].

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Gradients, Tensor};

use crate::model::llama::ForwardContext;
use crate::model::logprobs::{normed_rows_logprobs, token_logprobs, LogProbs, Padded, ScoredSeq};
use crate::model::CausalLm;

/// How gradients are computed (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segmented {
    /// Keep only each decoder layer's input and recompute the layer during backward.
    pub recompute: bool,
    /// Target positions per vocabulary chunk (0 = one chunk of all positions).
    pub logits_chunk: usize,
}

/// What [`Segmented::forward`] keeps for [`Segmented::backward`].
pub struct Tape {
    padded: Padded,
    /// Tables and masks on the autodiff device, for the recomputed layers.
    ctx: ForwardContext,
    /// With `recompute`: the input of every decoder layer (no graph).
    layer_inputs: Vec<Tensor<3>>,
    /// Without `recompute`: the last layer's output with its graph.
    graph_output: Option<Tensor<3>>,
    /// The last layer's output (before the final norm), no graph.
    last: Tensor<3>,
}

impl Segmented {
    /// Whether anything is segmented (otherwise the trainer takes the plain path).
    pub fn is_plain(&self) -> bool {
        !self.recompute && self.logits_chunk == 0
    }

    /// Per-target log-probs of `seqs` under the autodiff weights `model`; `token` is a leaf
    /// that requires grad, the rest of the graph is in the returned [`Tape`].
    pub fn forward(&self, model: &CausalLm, seqs: &[ScoredSeq], pad_id: u32) -> (LogProbs, Tape) {
        let device = model.device();
        let padded = Padded::new(seqs, pad_id);
        let (batch, width) = (padded.batch, padded.width);
        let ctx = model.context(batch, width, Some(&padded.attention), &device);
        // The forward without a graph runs on the autodiff device with no parameter that
        // requires grad: no op is recorded, and every value is bit for bit the one the plain
        // path computes (burn's kernels without autodiff round differently, ~1e-6).
        let frozen = model.clone().no_grad();
        let (layer_inputs, graph_output, last) = if self.recompute {
            let mut x = burn::tensor::module::embedding(
                frozen.model.embed_tokens.weight.val(),
                padded.input(&device),
            );
            let mut inputs = Vec::with_capacity(frozen.model.layers.len());
            for layer in &frozen.model.layers {
                inputs.push(x.clone());
                x = layer.forward(x, &ctx, false).0;
            }
            (inputs, None, x)
        } else {
            let mut x = burn::tensor::module::embedding(
                model.model.embed_tokens.weight.val(),
                padded.input(&device),
            );
            for layer in &model.model.layers {
                x = layer.forward(x, &ctx, false).0;
            }
            let last = x.clone().detach();
            (Vec::new(), Some(x), last)
        };
        let normed = frozen.model.norm.forward(last.clone());
        let logits = |h| frozen.logits_from_hidden(h);
        let token = token_logprobs(&logits, normed, &padded, self.logits_chunk)
            .detach()
            .require_grad();
        let lp = padded.log_probs(token);
        let tape = Tape {
            padded,
            ctx,
            layer_inputs,
            graph_output,
            last,
        };
        (lp, tape)
    }

    /// Adds the parameter gradients of the loss to `into`, given `grad_token`, the loss's
    /// gradient with respect to the `token` log-probs [`Segmented::forward`] returned.
    ///
    /// # Shapes
    /// `grad_token: [batch, width - 1]`
    pub fn backward(
        &self,
        model: &CausalLm,
        tape: Tape,
        grad_token: Tensor<2>,
        into: &mut GradientsParams,
    ) {
        let Tape {
            padded,
            ctx,
            layer_inputs,
            graph_output,
            last,
        } = tape;
        let (batch, width) = (padded.batch, padded.width);
        let [_, _, hidden] = last.dims();
        let n = batch * (width - 1);

        // Head, one chunk of target positions at a time. Chunks whose positions carry no
        // gradient (prompt, padding) add exactly nothing and are skipped.
        let g_token = grad_token.reshape([n]);
        let g_host: Vec<f32> = g_token
            .clone()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .expect("f32 after convert"); // CPU–GPU sync point: [tokens] floats.
                                          // Gradients of the hidden states come in their dtype (bf16 for a bf16 model).
        let (device, dtype) = (last.device(), last.dtype());
        let rows = last.narrow(1, 0, width - 1).reshape([n, hidden]);
        let chunk = if self.logits_chunk == 0 {
            n
        } else {
            self.logits_chunk.min(n)
        };
        let mut g_rows = Vec::with_capacity(n.div_ceil(chunk));
        for start in (0..n).step_by(chunk) {
            let len = chunk.min(n - start);
            if g_host[start..start + len].iter().all(|g| *g == 0.0) {
                g_rows.push(Tensor::<2>::zeros([len, hidden], (&device, dtype)));
                continue;
            }
            let x = rows.clone().narrow(0, start, len).detach().require_grad();
            let normed = model.model.norm.forward(x.clone());
            let targets = &padded.targets[start..start + len];
            let lp = normed_rows_logprobs(&|h| model.logits_from_hidden(h), normed, targets, 0);
            let mut grads = (lp * g_token.clone().narrow(0, start, len))
                .sum()
                .backward();
            g_rows.push(
                x.grad_remove(&mut grads)
                    .expect("the chunk's input requires grad"),
            );
            accumulate(&mut grads, model, into);
        }
        let g_last = Tensor::cat(
            vec![
                Tensor::cat(g_rows, 0).reshape([batch, width - 1, hidden]),
                Tensor::zeros([batch, 1, hidden], (&device, dtype)),
            ],
            1,
        );

        let Some(out) = graph_output else {
            let g_embedded = recomputed_layers(model, &ctx, layer_inputs, g_last, into);
            embedding_backward(model, &padded, g_embedded, into);
            return;
        };
        // The layers kept their graph: one backward through all of them and the embedding
        // (untracked only when every one of their parameters is frozen).
        if out.is_tracked() {
            let mut grads = (out * g_last).sum().backward();
            accumulate(&mut grads, model, into);
        }
    }
}

/// Back-propagates `g` (the gradient at the last layer's output) through the decoder layers,
/// last to first, each recomputed from its kept input; returns the gradient at the first
/// layer's input (the embedding output).
fn recomputed_layers(
    model: &CausalLm,
    ctx: &ForwardContext,
    mut layer_inputs: Vec<Tensor<3>>,
    mut g: Tensor<3>,
    into: &mut GradientsParams,
) -> Tensor<3> {
    for layer in model.model.layers.iter().rev() {
        let x = layer_inputs
            .pop()
            .expect("one kept input per layer")
            .detach()
            .require_grad();
        let out = layer.forward(x.clone(), ctx, false).0;
        let mut grads = (out * g).sum().backward();
        g = x
            .grad_remove(&mut grads)
            .expect("the layer's input requires grad");
        accumulate(&mut grads, layer, into);
    }
    g
}

/// The embedding's gradient: a gather's backward is a scatter-add into the rows it read.
fn embedding_backward(model: &CausalLm, padded: &Padded, g: Tensor<3>, into: &mut GradientsParams) {
    let weight = &model.model.embed_tokens.weight;
    if weight.is_require_grad() {
        let embedded = burn::tensor::module::embedding(weight.val(), padded.input(&model.device()));
        let mut grads = (embedded * g).sum().backward();
        accumulate(&mut grads, &model.model.embed_tokens, into);
    }
}

/// Moves the gradients of `module`'s trainable parameters out of `grads` and adds them to
/// those already in `into` (a parameter used by two segments gets the sum).
fn accumulate<M: Module>(grads: &mut Gradients, module: &M, into: &mut GradientsParams) {
    module.visit(&mut Accumulate { grads, into });
}

struct Accumulate<'a> {
    /// One segment's backward result.
    grads: &'a mut Gradients,
    /// The step's gradients so far.
    into: &'a mut GradientsParams,
}

impl ModuleVisitor for Accumulate<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !param.is_require_grad() {
            return;
        }
        let Some(grad) = param.val().grad_remove(self.grads) else {
            return;
        };
        // A second contribution (another head chunk, the tied embedding's other use, the
        // other batch) is added in f32 and rounded to the gradient's dtype once per sum, as
        // a matmul accumulating all positions would round its f32 sum once.
        let sum = match self.into.remove::<D>(param.id) {
            Some(previous) => {
                let dtype = grad.dtype();
                (previous.cast(DType::F32) + grad.cast(DType::F32)).cast(dtype)
            }
            None => grad,
        };
        self.into.register(param.id, sum);
    }
}
