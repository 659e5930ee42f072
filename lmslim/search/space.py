"""The search space: which stage combinations a trial may pick, and the recipe stages each pick becomes.

Every dimension is a list of choices; a trial draws one value per dimension (dimensions that do not
apply to its earlier draws are not drawn, e.g. ``kd_steps`` when nothing was removed). The stages
follow the order the recipe validator requires: structured removal (heads, FFN neurons, layers),
distillation from the input model to recover, unstructured or N:M sparsity, then the engine's
quantization: a ``quantize`` stage for PyTorch, an ``export`` stage writing the file llama.cpp or ONNX
Runtime runs.

Defaults per engine leave out what cannot pay there: llama.cpp and ONNX Runtime run dense kernels,
so zeroed weights cost the same as any others and unstructured sparsity is not drawn for them (a
``--space`` file may still ask for it). q4_1 is not among the default GGUF types: SmolLM2's released
weights already sit on that grid, so a q4_1 export of it is lossless by construction and no result.

A ``--space`` YAML file replaces the choices of the dimensions it names::

    neurons: [0, 0.25]
    layers: [0]
    gguf_type: [q8_0, q4_k_m, q4_0]

Example:
    >>> space = default_space("llama.cpp", hidden_size=576, n_layers=30)
    >>> stages_for({"neurons": 0.25, "layers": 0.0, "heads": 0.0, "kd_steps": 100, "gguf_type": "q4_0",
    ...             "gguf_method": "gptq", "importance": False, "embed_type": "default"}, space)[-1]
    {'export': {'format': 'gguf', 'type': 'q4_0', 'method': 'gptq', 'calib_samples': 16, 'seq_len': 256}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmslim.core.configs import did_you_mean, show
from lmslim.core.errors import UserError

ENGINES = ("llama.cpp", "onnxruntime", "torch")
_STRUCTURE = {"heads": (0.0,), "neurons": (0.0, 0.25, 0.5), "layers": (0.0, 0.125, 0.25), "kd_steps": (0, 100, 300)}
_DEFAULTS: dict[str, dict[str, tuple]] = {
    "torch": {**_STRUCTURE, "sparsity": (0.0, 0.5, "2:4"),
              "quant": ("none", "dynamic-int8", "rtn-w8", "rtn-w4", "gptq-w4"), "group_size": (32, 128)},
    "llama.cpp": {**_STRUCTURE, "sparsity": (0.0,), "gguf_type": ("q8_0", "q6_k", "q5_0", "q4_k_m", "q4_0",
                                                                   "q3_k_m", "q2_k"),
                  "gguf_method": ("rtn", "gptq"), "importance": (False, True), "embed_type": ("default", "q8_0")},
    "onnxruntime": {**_STRUCTURE, "sparsity": (0.0,), "onnx_type": ("f32", "int8", "int4"),
                    "group_size": (32, 128), "lm_head": (False, True)},
}
_QUANT = {"none": None, "dynamic-int8": {"method": "dynamic-int8"}, "rtn-w8": {"method": "rtn", "bits": 8},
          "rtn-w4": {"method": "rtn", "bits": 4}, "gptq-w4": {"method": "gptq", "bits": 4}}
MAX_CHOICES = 64


@dataclass(frozen=True)
class Space:
    """Choices per dimension for one engine, plus the fixed budgets of calibrated stages."""

    engine: str
    dims: dict[str, tuple] = field(default_factory=dict)
    calib_samples: int = 16
    seq_len: int = 256
    kd_batch: int = 8
    kd_lr: float = 2e-4

    def size(self) -> int:
        """Combinations before conditional dimensions collapse (an upper bound)."""
        return math.prod(len(v) for v in self.dims.values())


def _gguf_types() -> tuple[str, ...]:
    from lmslim.modelio.export.gguf_blocks import GGUF_TYPES

    return GGUF_TYPES


def default_space(engine: str, hidden_size: int, n_layers: int) -> Space:
    """The engine's default dimensions, with choices the model cannot take removed (see ``constrain``)."""
    if engine not in ENGINES:
        raise UserError(f"unknown engine {show(engine)}; choose one of: {', '.join(ENGINES)}")
    dims = dict(_DEFAULTS[engine])
    if engine == "llama.cpp":  # the types this build can write (a writer may be missing)
        dims["gguf_type"] = tuple(t for t in dims["gguf_type"] if t in _gguf_types())
    return constrain(Space(engine, dims), hidden_size, n_layers)


def with_overrides(space: Space, overrides: dict[str, Any], hidden_size: int, n_layers: int) -> Space:
    """``space`` with the dimensions a ``--space`` file names replaced; unknown names are an error."""
    dims = dict(space.dims)
    for key, value in overrides.items():
        allowed = set(_DEFAULTS[space.engine])
        if key not in allowed:
            other = [e for e in ENGINES if key in _DEFAULTS[e]]
            hint = f" (a dimension of engine {other[0]})" if other else did_you_mean(key, sorted(allowed))
            raise UserError(f"--space: {show(key)} is not a dimension of engine {space.engine}{hint}")
        if not isinstance(value, list) or len(value) > MAX_CHOICES:
            raise UserError(f"--space: {key} must be a list of at most {MAX_CHOICES} choices, got {show(value)}")
        dims[key] = tuple(value)
    return constrain(replace(space, dims=dims), hidden_size, n_layers)


def load_overrides(path: Path) -> dict[str, Any]:
    from lmslim.core.safeyaml import load_yaml_file

    raw = load_yaml_file(path, "--space")
    if not isinstance(raw, dict):
        raise UserError(f"--space {path}: expected a mapping of dimension: [choices]")
    return raw


def _check(key: str, value: Any, hidden_size: int, n_layers: int) -> str | None:
    """Why ``value`` cannot be a choice of ``key`` for this model (None: it can)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if key in ("heads", "neurons", "layers"):
        if not number or not 0 <= value < 1:
            return "a fraction in [0, 1)"
        if key == "layers" and round(value * n_layers) >= n_layers:
            return f"leaves no layer of {n_layers}"
    elif key == "kd_steps":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100_000:
            return "a step count in [0, 100000]"
    elif key == "sparsity":
        if isinstance(value, str):
            n, _, m = value.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m) <= 64):
                return "a fraction or an N:M pattern like '2:4'"
        elif not number or not 0 <= value < 1:
            return "a fraction in [0, 1) or 'N:M'"
    elif key == "group_size":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or hidden_size % value:
            return f"a group size dividing the hidden size {hidden_size}"
    elif key in ("importance", "lm_head"):
        if not isinstance(value, bool):
            return "true or false"
    else:
        allowed = {"quant": tuple(_QUANT), "gguf_type": _gguf_types() if key == "gguf_type" else (),
                   "gguf_method": ("rtn", "gptq", "awq", "awq_gptq"), "embed_type": ("default",) + _gguf_types(),
                   "onnx_type": ("f32", "int8", "int4")}[key]
        if value not in allowed:
            return f"one of {', '.join(map(str, allowed))}"
    return None


def constrain(space: Space, hidden_size: int, n_layers: int) -> Space:
    """Drop choices the model cannot take; a dimension left with none makes the space empty (an error)."""
    dims = {}
    for key, values in space.dims.items():
        keep, why = [], None
        for v in dict.fromkeys(values):  # in order, without repeats
            reason = _check(key, v, hidden_size, n_layers)
            if reason is None:
                keep.append(v)
            else:
                why = why or f"{show(v)} is not {reason}"
        if not keep:
            raise UserError(f"the search space is empty after constraints: {key} has no valid choice"
                            + (f" ({why})" if why else ""))
        dims[key] = tuple(keep)
    return replace(space, dims=dims)


def suggest(trial, space: Space) -> dict[str, Any]:
    """Draw one value per applicable dimension from an Optuna trial (define-by-run, conditional)."""
    d = space.dims
    params: dict[str, Any] = {}

    def pick(key: str) -> Any:
        values = d[key]
        # Optuna's categorical choices must be None/bool/int/float/str; draw the index of mixed lists.
        params[key] = values[0] if len(values) == 1 else trial.suggest_categorical(key, list(values))
        return params[key]

    for key in ("heads", "neurons", "layers"):
        pick(key)
    if any(params[k] for k in ("heads", "neurons", "layers")):
        pick("kd_steps")
    pick("sparsity")
    if space.engine == "torch":
        if pick("quant") in ("rtn-w4", "gptq-w4"):
            pick("group_size")
    elif space.engine == "llama.cpp":
        kind = pick("gguf_type")
        if kind not in ("f32", "f16"):  # calibrated rounding works on every quantized type's own grid
            pick("gguf_method")
        if kind not in ("f32", "f16", "q8_0"):
            pick("importance")
        pick("embed_type")
    else:
        if pick("onnx_type") == "int4":
            pick("group_size")
        if params["onnx_type"] != "f32":
            pick("lm_head")
    return params


def stages_for(params: dict[str, Any], space: Space) -> list[dict[str, Any]]:
    """The recipe stages of one draw (see the module docstring for their order)."""
    calib = {"calib_samples": space.calib_samples, "seq_len": space.seq_len}
    stages: list[dict[str, Any]] = []
    for key in ("heads", "neurons", "layers"):
        if params.get(key):
            stages.append({"prune": {"method": key, "fraction": params[key], **calib}})
    if stages and params.get("kd_steps"):
        stages.append({"distill": {"teacher": "input", "alpha": 0.5, "temperature": 2.0, "train": {
            "max_steps": params["kd_steps"], "optim": {"lr": space.kd_lr, "weight_decay": 0.01},
            "schedule": {"name": "cosine", "warmup_steps": min(20, params["kd_steps"] // 10)},
            "batch": {"batch_size": space.kd_batch, "max_length": space.seq_len}}}})
    sparsity = params.get("sparsity")
    if isinstance(sparsity, str):
        stages.append({"prune": {"method": "wanda", "n_m": sparsity, **calib}})
    elif sparsity:
        stages.append({"prune": {"method": "wanda", "sparsity": sparsity, **calib}})
    if space.engine == "torch":
        quant = _QUANT[params["quant"]]
        if quant is not None:
            q = dict(quant)
            if q.get("bits") == 4:
                q["group_size"] = params["group_size"]
            if q["method"] == "gptq":
                q.update(calib)
            stages.append({"quantize": q})
        if not stages:  # the input model as it is: a reference point, measured like every trial
            stages.append({"export": {"format": "hf"}})
    elif space.engine == "llama.cpp":
        e: dict[str, Any] = {"format": "gguf", "type": params["gguf_type"]}
        if params.get("gguf_method", "rtn") != "rtn":
            e["method"] = params["gguf_method"]
        if params.get("importance"):
            e["importance"] = True
        if params.get("embed_type", "default") != "default":
            e["embed_type"] = params["embed_type"]
        if e.get("method") or e.get("importance"):
            e.update(calib)
        stages.append({"export": e})
    else:
        e = {"format": "onnx", "type": params["onnx_type"]}
        if params["onnx_type"] == "int4":
            e["group_size"] = params["group_size"]
        if params.get("lm_head"):
            e["lm_head"] = True
        stages.append({"export": e})
    return stages


def techniques(stages: list[dict[str, Any]]) -> list[str]:
    """Technique families a trial combines (``structured``, ``distill``, ``sparsity``, ``quantize``)."""
    out = []
    for s in stages:
        (name, opts), = s.items()
        kind = {"prune": "sparsity" if opts.get("method") == "wanda" else "structured"}.get(name, name)
        kind = "quantize" if name == "export" and opts.get("type") not in (None, "f32", "f16") else kind
        if kind not in out and kind != "export":
            out.append(kind)
    return out
