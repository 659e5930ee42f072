"""A GPTQ k-quant mix export in the real llama.cpp: it runs the weights the file stores.

Skipped only when llama_cpp is not installed and LMSLIM_REQUIRE_ENGINES is unset (CI sets it).
"""

from __future__ import annotations

import torch

from tests.engines import require_engines

require_engines("llama_cpp")

from lmslim.compress.export import ExportConfig, export_  # noqa: E402
from tests.measure.test_engine_llama_cpp import _file_weights_model, _logits  # noqa: E402
from tests.modelio.test_export_gguf import tiny_llama  # noqa: E402


def test_gptq_q4_k_m_file_runs_in_llama_cpp_on_its_stored_weights(tmp_path):
    m, tok = tiny_llama(hidden=256, ff=256, init=0.08, seed=1)  # rows of 256: whole super-blocks
    ref, _ = tiny_llama(hidden=256, ff=256, init=0.08, seed=1)
    path = tmp_path / "gptq.gguf"
    calib = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(0))
    report = export_(m, tok, ExportConfig(format="gguf", type="q4_k_m", method="gptq"), path, calib)
    assert report["types"] == {"q6_k": 3, "q4_k": 12, "f32": 5} and report["gptq_matrices"] == 14
    ids = list(range(3, 99))
    with torch.no_grad():
        float_logits = ref(input_ids=torch.tensor([ids])).logits[0]
        stored = _file_weights_model(m, path)(input_ids=torch.tensor([ids])).logits[0]
    got = _logits(path, ids)
    # llama.cpp rounds activations to 8 bits for these dot products; a wrong layout or code order
    # would put its logits as far from the stored weights as the quantization itself
    assert (got - stored).abs().max() / float_logits.abs().max() < 0.08
    assert (got - stored).abs().max() < 0.5 * (stored - float_logits).abs().max()
