"""The ONNX graph of a Llama decoder with a KV cache, built node by node from the module weights.

Built with ``onnx.helper`` rather than traced, so every weight lands in the graph exactly as lmslim
holds it and each layer can have its own head count and FFN width (structured pruning). Standard
ONNX ops (opset 18) everywhere except the quantized matrices, which are ONNX Runtime's
``com.microsoft.MatMulNBits`` (``onnx_quant``).

Graph (``B`` batch, ``S`` new tokens, ``P`` cached tokens, ``T = P + S``; all axes dynamic):

- inputs ``input_ids`` (B, S) int64 and, per layer i, ``past_key_values.i.key|value`` (B, kv_i, P, d);
  optional ``attention_mask`` (B, T) int64, 1 for a token and 0 for padding, covering the cached and
  the new tokens as in transformers (default: no padding);
- outputs ``logits`` (B, S, V) float32 and ``present.i.key|value`` (B, kv_i, T, d).

A prefill is a call with empty (P = 0) caches and a decode step feeds back the ``present`` tensors.
Without a mask the new tokens sit at positions ``P .. T-1`` (read from the cache's length). With one,
a padded batch runs as transformers runs it: each token's position is the number of real tokens
before it (``cumsum(mask) − 1``, so left padding does not shift positions) and no query attends to a
padded key. The mask is an input with a default value (an initializer of the same name: a (1, 1)
one, broadcast to (B, T)), so callers that never pad leave it out.

Per layer: RMSNorm (x / sqrt(mean(x²) + eps) · w, the form ORT fuses into its own kernel), q/k/v
projections, rotary embedding in Hugging Face's half-split layout from cos/sin tables computed as
``LlamaRotaryEmbedding`` computes them, grouped-query attention by broadcasting (queries reshaped to
(B, kv, rep, S, d) against keys (B, kv, 1, T, d), so KV heads are never copied), a causal mask on
absolute positions, SiLU-gated MLP, residuals. The LM head reuses the embedding table when tied
(``Gemm`` with ``transB``: no transposed copy).
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import TensorProto, helper, numpy_helper

from lmslim.nn.quant_linear import QuantLinear

OPSET = 18
IR_VERSION = 10  # ONNX Runtime 1.31 reads IR <= 13; 10 is what opset 18 needs


class GraphBuilder:
    """Accumulates nodes and initializers with unique names; ``linear`` picks the matrix encoding."""

    def __init__(self, encode_linear):
        self.nodes, self.inits, self._n = [], [], 0
        self._encode_linear = encode_linear  # (builder, x, module, name) -> output name

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, array, hint: str) -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, domain: str = "",
           **attrs) -> str | list[str]:
        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type), domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def linear(self, x: str, module, hint: str) -> str:
        y = self._encode_linear(self, x, module, hint)
        if module.bias is not None:
            y = self.op("Add", [y, self.const(module.bias.detach().float().numpy(), hint + ".bias")])
        return y


def _rms_norm(g: GraphBuilder, x: str, norm, hint: str) -> str:
    sq = g.op("Pow", [x, g.const(np.float32(2.0), "two")])
    var = g.op("ReduceMean", [sq, g.const(np.array([-1], np.int64), "axis")], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var, g.const(np.float32(norm.variance_epsilon), "eps")])])
    return g.op("Mul", [g.op("Div", [x, std]), g.const(norm.weight.detach().float().numpy(), hint)], hint)


def _rope(g: GraphBuilder, x: str, cos: str, sin: str) -> str:
    """x·cos + rotate_half(x)·sin for x (B, h, S, d); cos/sin (B, 1, S, d)."""
    x1, x2 = g.op("Split", [x], n_out=2, axis=-1, num_outputs=2)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


def _heads(g: GraphBuilder, x: str, n: int, d: int) -> str:
    """(B, S, n·d) -> (B, n, S, d)."""
    x = g.op("Reshape", [x, g.const(np.array([0, 0, n, d], np.int64), "shape")])
    return g.op("Transpose", [x], perm=[0, 2, 1, 3])


def _attention(g: GraphBuilder, x: str, attn, i: int, ctx: dict) -> tuple[str, str, str]:
    d = ctx["head_dim"]
    n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    rep = n_q // n_kv
    q = _rope(g, _heads(g, g.linear(x, attn.q_proj, f"l{i}.q"), n_q, d), ctx["cos"], ctx["sin"])
    k = _rope(g, _heads(g, g.linear(x, attn.k_proj, f"l{i}.k"), n_kv, d), ctx["cos"], ctx["sin"])
    v = _heads(g, g.linear(x, attn.v_proj, f"l{i}.v"), n_kv, d)
    k_all = g.op("Concat", [f"past_key_values.{i}.key", k], axis=2)  # (B, kv, T, d)
    v_all = g.op("Concat", [f"past_key_values.{i}.value", v], axis=2)
    g.nodes.append(helper.make_node("Identity", [k_all], [f"present.{i}.key"]))
    g.nodes.append(helper.make_node("Identity", [v_all], [f"present.{i}.value"]))
    q5 = g.op("Reshape", [q, g.const(np.array([0, n_kv, rep, -1, d], np.int64), "shape")])  # (B, kv, rep, S, d)
    two = g.const(np.array([2], np.int64), "axis2")
    k_t = g.op("Transpose", [g.op("Unsqueeze", [k_all, two])], perm=[0, 1, 2, 4, 3])  # (B, kv, 1, d, T)
    scores = g.op("Mul", [g.op("MatMul", [q5, k_t]), g.const(np.float32(attn.scaling), "scaling")])  # (B,kv,rep,S,T)
    probs = g.op("Softmax", [g.op("Add", [scores, ctx["mask"]])], axis=-1)
    out = g.op("MatMul", [probs, g.op("Unsqueeze", [v_all, two])])  # (B, kv, rep, S, d)
    out = g.op("Reshape", [out, g.const(np.array([0, n_q, -1, d], np.int64), "shape")])  # (B, q, S, d)
    out = g.op("Transpose", [out], perm=[0, 2, 1, 3])  # (B, S, q, d)
    out = g.op("Reshape", [out, g.const(np.array([0, 0, n_q * d], np.int64), "shape")])
    return g.linear(out, attn.o_proj, f"l{i}.o"), n_q, n_kv


def _mlp(g: GraphBuilder, x: str, mlp, i: int) -> str:
    gate = g.linear(x, mlp.gate_proj, f"l{i}.gate")
    up = g.linear(x, mlp.up_proj, f"l{i}.up")
    act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])  # silu(gate) · up
    return g.linear(act, mlp.down_proj, f"l{i}.down")


def _positions(g: GraphBuilder, model) -> dict:
    """Positions of the new tokens, their cos/sin rows (B, 1, S, d) and the additive attention mask
    (B, 1, 1, S, T): causal on cache slots and closed to padded keys; shared by all layers."""
    rotary = model.model.rotary_emb
    limit = int(model.config.max_position_embeddings)
    with torch.no_grad():  # as LlamaRotaryEmbedding.forward computes them, in float32
        freqs = torch.arange(limit, dtype=torch.float32)[:, None] * rotary.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # (P_max, d)
        cos, sin = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
    past = g.op("Shape", ["past_key_values.0.key"], start=2, end=3)
    new = g.op("Shape", ["input_ids"], start=1, end=2)
    end = g.op("Add", [past, new])  # (1,) = T
    scalar = g.const(np.array([0], np.int64), "axis0")
    start = g.op("Squeeze", [past, scalar])
    total = g.op("Squeeze", [end, scalar])
    one, zero = g.const(np.int64(1), "one"), g.const(np.int64(0), "zero")
    slots = g.op("Range", [start, total, one], "query_slots")  # (S,) cache slots of the new tokens
    keys = g.op("Range", [zero, total, one], "key_slots")  # (T,)
    causal = g.op("LessOrEqual", [keys, g.op("Unsqueeze", [slots, g.const(np.array([1], np.int64), "axis1")])])
    g.inits.append(numpy_helper.from_array(np.ones((1, 1), np.int64), "attention_mask"))  # the default
    shape = g.op("Concat", [g.op("Shape", ["input_ids"], start=0, end=1), end], axis=0)
    present = g.op("Expand", ["attention_mask", shape], "mask_bt")  # (B, T)
    pos = g.op("Sub", [g.op("CumSum", [present, g.const(np.int64(1), "axis")]), one])  # (B, T) transformers' rule
    pos = g.op("Max", [g.op("Slice", [pos, past, end, g.const(np.array([1], np.int64), "axis1")]), zero],
               "positions")  # (B, S); a padded token's −1 reads row 0, which nothing attends to
    keep = g.op("Unsqueeze", [g.op("Cast", [present], to=TensorProto.BOOL),
                              g.const(np.array([1, 2, 3], np.int64), "axes")])  # (B, 1, 1, 1, T)
    allowed = g.op("And", [causal, keep])  # (B, 1, 1, S, T)
    # finite, not −inf: a padded query that sees no key gets a uniform row instead of NaNs that the
    # next layer's matmuls would spread to every token (0·NaN is NaN)
    mask = g.op("Where", [allowed, g.const(np.float32(0), "zero_f"),
                          g.const(np.float32(np.finfo(np.float32).min), "neg")], "attention_bias")
    axis1 = g.const(np.array([1], np.int64), "axis1")
    return {"cos": g.op("Unsqueeze", [g.op("Gather", [g.const(cos.numpy(), "rope_cos"), pos]), axis1], "cos"),
            "sin": g.op("Unsqueeze", [g.op("Gather", [g.const(sin.numpy(), "rope_sin"), pos]), axis1], "sin"),
            "mask": mask}


def embedding_table(model) -> torch.Tensor:
    """The (V, H) float32 input embedding (a lmslim-quantized table as its exact dequantized values)."""
    emb = model.model.embed_tokens
    return emb.dequantized_weight() if hasattr(emb, "dequantized_weight") else emb.weight.detach().float()


def tied_head(model) -> bool:
    """Whether the LM head is the float embedding table itself (then it is read by ``Gemm``, stored once)."""
    head, emb = model.lm_head, model.model.embed_tokens
    return (not isinstance(head, QuantLinear) and isinstance(getattr(emb, "weight", None), torch.Tensor)
            and head.weight.data_ptr() == emb.weight.data_ptr())


def _lm_head(g: GraphBuilder, model, x: str, embed: str, hidden: int, vocab: int) -> str:
    if not tied_head(model) or getattr(g, "quantize_head", False):
        return g.linear(x, model.lm_head, "lm_head")
    # Gemm reads the (V, H) table with transB: the tied table is stored once, never transposed.
    flat = g.op("Reshape", [x, g.const(np.array([-1, hidden], np.int64), "shape")])  # (B·S, H)
    logits = g.op("Gemm", [flat, embed], transB=1)  # (B·S, V)
    shape = g.op("Concat", [g.op("Shape", ["input_ids"]), g.const(np.array([vocab], np.int64), "vocab")], axis=0)
    return g.op("Reshape", [logits, shape])


def build_graph(model, encode_linear, quantize_head: bool = False):
    """The ``onnx.ModelProto`` of a Llama causal LM (see the module docstring); returns (model, layers)."""
    g = GraphBuilder(encode_linear)
    g.quantize_head = quantize_head
    base = model.model
    table = embedding_table(model)
    vocab, hidden = table.shape
    d = base.layers[0].self_attn.head_dim
    ctx = {"head_dim": d, **_positions(g, model)}
    embed = g.const(table.numpy(), "embed_tokens")
    x = g.op("Gather", [embed, "input_ids"], "embeddings")  # (B, S, H)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"])]
    outputs, layers = [], []
    for i, block in enumerate(base.layers):
        attn, n_q, n_kv = _attention(g, _rms_norm(g, x, block.input_layernorm, f"l{i}.attn_norm"),
                                     block.self_attn, i, ctx)
        x = g.op("Add", [x, attn], f"l{i}.resid_attn")
        x = g.op("Add", [x, _mlp(g, _rms_norm(g, x, block.post_attention_layernorm, f"l{i}.ffn_norm"), block.mlp, i)],
                 f"l{i}.resid_mlp")
        layers.append({"heads": n_q, "kv_heads": n_kv, "ffn": block.mlp.gate_proj.out_features})
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch", n_kv, "past_sequence", d]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch", n_kv, "total_sequence", d]))
    x = _rms_norm(g, x, base.norm, "final_norm")
    logits = _lm_head(g, model, x, embed, hidden, vocab)
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    outputs.insert(0, helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab]))
    graph = helper.make_graph(g.nodes, "lmslim_llama", inputs, outputs, g.inits)
    proto = helper.make_model(graph, ir_version=IR_VERSION, producer_name="lmslim",
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)])
    return proto, layers
