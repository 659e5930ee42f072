"""ONNX export for ONNX Runtime: a Llama decoder with a KV cache, float or with lmslim's integer weights.

The output is a folder that runs on its own: ``model.onnx`` (+ ``model.onnx.data``, the weights as
ONNX external data), the tokenizer files, and ``config.json`` (the Hugging Face config plus an
``lmslim_onnx`` section: type, per-layer heads/FFN widths, input/output names, and the cost numbers
``lmslim bench --engine onnxruntime`` reads). The graph is built from the module weights
(``onnx_graph``), not traced, so layers of different shapes (structured pruning) export as they are.

Types (``--type``): ``f32`` writes every matrix as a float ``MatMul`` (a lmslim-quantized matrix as
its exact dequantized weight). ``int8``/``int4`` write every block matrix as ONNX Runtime's
``MatMulNBits`` (``onnx_quant``): a matrix lmslim already quantized keeps its codes, scales and
zero points; a float matrix is rounded by lmslim's RTN (asymmetric, ``group_size`` columns a group).
The embedding table stays float32 (a lookup reads one row); the LM head is quantized only with
``lm_head=True`` (or when lmslim quantized it).

Refused with a one-line error: non-Llama models, non-default RoPE, non-SiLU MLPs, a quantized matrix
whose bits are not the type's or whose group size is not a MatMulNBits block (a power of two >= 16).

Example:
    >>> import tempfile, pathlib
    >>> from lmslim.modelio import load_model
    >>> from lmslim.modelio.export import export_model
    >>> lm = load_model("builtin:tiny-llama")
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "tiny-onnx"
    >>> export_model(lm.model, lm.tokenizer, "onnx", out, ONNXExportConfig(type="int4", group_size=32))["matmul_nbits"]
    14
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmslim.core.errors import UserError
from lmslim.modelio.export import Exporter, register_exporter
from lmslim.nn.blocks import family
from lmslim.nn.quant_linear import QuantLinear

log = logging.getLogger(__name__)

ONNX_TYPES = ("f32", "int8", "int4")
MODEL_FILE, DATA_FILE, META_KEY = "model.onnx", "model.onnx.data", "lmslim_onnx"


@dataclass(frozen=True)
class ONNXExportConfig:
    """How the matrices of the ONNX export are stored.

    Args:
        type: f32 | int8 | int4 (int types use ONNX Runtime's MatMulNBits).
        group_size: columns per scale when a float matrix is quantized at export (a power of two >= 16).
        lm_head: quantize a float LM head too (the embedding lookup stays float32).
        int8_compute: let ORT multiply in int8 (MatMulNBits ``accuracy_level=4``: activations rounded per
            block at run time, faster on CPU); False computes in float32 from the dequantized weights.
    """

    type: str = "f32"
    group_size: int = 128
    lm_head: bool = False
    int8_compute: bool = True

    def __post_init__(self) -> None:
        from lmslim.modelio.export.onnx_quant import check_block

        if self.type not in ONNX_TYPES:
            raise UserError(f"unknown ONNX type {self.type!r}; choose one of: {', '.join(ONNX_TYPES)}")
        check_block(self.group_size, "--group-size")


def check_llama(model) -> None:
    """One-line refusal for what the graph builder does not express."""
    cfg = model.config
    if getattr(cfg, "model_type", None) != "llama" or family(model) != "llama":
        raise UserError(f"ONNX export supports Llama-architecture causal LMs; this model is "
                        f"{getattr(cfg, 'model_type', type(model).__name__)}")
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise UserError(f"ONNX export: RoPE scaling {rope.get('rope_type')!r} is not mapped; only plain RoPE is")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise UserError(f"ONNX export: activation {cfg.hidden_act!r} is not mapped; only silu is")


def _encoder(config: ONNXExportConfig, tally: dict[str, int]):
    """The ``encode_linear`` callback of the graph builder, counting parameters and bytes per matrix."""
    from lmslim.modelio.export.onnx_quant import float_matmul, matmul_nbits

    def encode(g, x: str, module, where: str) -> str:
        before = len(g.inits)
        float_head = where == "lm_head" and not config.lm_head and not isinstance(module, QuantLinear)
        if config.type == "f32" or float_head:
            y = float_matmul(g, x, module, where)
        else:
            y = matmul_nbits(g, x, module, config.type, config.group_size, 4 if config.int8_compute else 0, where)
            tally["matmul_nbits"] += 1
        tally["linear_params"] += module.in_features * module.out_features
        tally["weight_bytes"] += sum(len(t.raw_data) for t in g.inits[before:])
        return y

    return encode


def _cost(model, tally: dict[str, int], layers: list[dict]) -> dict[str, Any]:
    """What ``lmslim.measure.cost.ModelShape`` needs, counted on the graph as written (weights float32)."""
    from lmslim.modelio.export.onnx_graph import embedding_table

    vocab, hidden = embedding_table(model).shape
    d = model.model.layers[0].self_attn.head_dim
    table = vocab * hidden
    norms = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("norm"))
    gemm_head = not tally["head_encoded"]  # the tied table is the LM head: read whole every token
    return {"layers": len(layers), "heads": round(sum(x["heads"] for x in layers) / len(layers)),
            "kv_heads": round(sum(x["kv_heads"] for x in layers) / len(layers)), "head_dim": d,
            "linear_params": tally["linear_params"] + (table if gemm_head else 0),
            "weight_bytes": tally["weight_bytes"] + (table * 4 if gemm_head else 0) + norms * 4,
            "params": tally["linear_params"] + norms + table,  # the table once: looked up (and the tied head)
            "kv_bytes_per_token": sum(2 * x["kv_heads"] * d * 4 for x in layers)}  # float32 cache


def write_onnx(model, tokenizer, folder: Path, config: ONNXExportConfig) -> dict[str, Any]:
    """Write the export folder (see the module docstring) into ``folder``, which exists and is empty."""
    try:
        import onnx

        from lmslim.modelio.export.onnx_graph import build_graph
    except ImportError as e:
        raise UserError("ONNX export needs the onnx package: pip install 'lmslim[engines]'") from e

    if tokenizer is None:
        raise UserError("ONNX export needs the model's tokenizer (the engine tokenizes with the folder's own)")
    check_llama(model)
    tally = {"linear_params": 0, "weight_bytes": 0, "matmul_nbits": 0, "head_encoded": 0}
    encode = _encoder(config, tally)

    def counted(g, x, module, where):
        tally["head_encoded"] |= where == "lm_head"
        return encode(g, x, module, where)

    proto, layers = build_graph(model, counted, quantize_head=config.lm_head and config.type != "f32")
    onnx.save_model(proto, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    tokenizer.save_pretrained(folder)
    for p in folder.iterdir():
        p.chmod(0o644)  # onnx writes the external data private; an export is an ordinary file set
    cfg = model.config.to_dict()
    cfg[META_KEY] = {"type": config.type, "export": asdict(config), "layers": layers, "model_file": MODEL_FILE,
                     "inputs": ["input_ids"] + [f"past_key_values.{i}.{k}" for i in range(len(layers))
                                                for k in ("key", "value")],
                     "optional_inputs": ["attention_mask"],
                     "cost": _cost(model, tally, layers)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name in (MODEL_FILE, DATA_FILE))
    log.info("onnx export: %d nodes, %d MatMulNBits, %.1f MB", len(proto.graph.node), tally["matmul_nbits"], size / 1e6)
    return {"format": "onnx", "type": config.type, "nodes": len(proto.graph.node),
            "matmul_nbits": tally["matmul_nbits"],
            "layers": layers, "bytes": size}


def _write(model, tokenizer, path: Path, options: ONNXExportConfig | None) -> dict[str, Any]:
    return write_onnx(model, tokenizer, path, options or ONNXExportConfig())


def is_onnx_export(path: Path) -> bool:
    """Whether ``path`` is a folder this exporter wrote."""
    cfg = Path(path) / "config.json"
    if not (Path(path) / MODEL_FILE).is_file() or not cfg.is_file():
        return False
    try:
        return META_KEY in json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False


register_exporter(Exporter("onnx", "", ONNX_TYPES, _write, folder=True, config=ONNXExportConfig,
                           engine="onnxruntime"))
