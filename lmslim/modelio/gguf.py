"""Reading GGUF files (llama.cpp's format): a checked header, then dequantized to an fp32 folder.

lmslim compresses a GGUF model by dequantizing it once into a plain Hugging Face folder (cached
under ``$LMSLIM_HOME/models/gguf``); transformers' GGUF reader does the dequantizing.
"""

from __future__ import annotations

from pathlib import Path

from lmslim.core.errors import UserError
from lmslim.core.io import check_saved_model
from lmslim.modelio.load import check_loading_info


def check_gguf(path: Path) -> None:
    """A readable GGUF header (magic, version, metadata, tensor table), or a one-line error."""
    try:
        from gguf import GGUFReader

        GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises many types for a damaged file
        raise UserError(f"{path} could not be read as a GGUF model ({type(e).__name__}: {e})") from e



def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a plain fp32 Hugging Face folder (safetensors + tokenizer).

    transformers refuses to ``save_pretrained`` a model loaded from GGUF (it carries a GGUF
    quantization config), so the weights are moved into a fresh model built from the same config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        src, info = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, output_loading_info=True,
                                                         ignore_mismatched_sizes=True, **kw)
    except Exception as e:  # noqa: BLE001 - any parse failure means the file is not usable
        raise UserError(f"{gguf} could not be read as a GGUF model ({type(e).__name__}: {e})") from e
    check_loading_info(src, info, str(gguf))  # a tensor the file lacks would be initialised at random
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config = AutoConfig.for_model(**{k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    # A tied lm_head is absent from the GGUF state dict; anything else missing is a real problem.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{gguf}: weights do not match the architecture (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    check_saved_model(out)
