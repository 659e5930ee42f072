"""Model I/O: naming a model (specs), loading it, and saving it in a registered format.

Everything that reads or writes a model folder goes through here; techniques produce modules
(``lmslim.nn``) and measurement loads whatever it is given, without knowing how it was made.

Example:
    >>> from lmslim.modelio import load_model
    >>> load_model("builtin:tiny-llama").model.config.model_type
    'llama'
"""

from lmslim.modelio.formats import save_model
from lmslim.modelio.load import LoadedModel, check_loading_info, load_model
from lmslim.modelio.spec import TASKS, ResolvedModel, resolve

__all__ = ["LoadedModel", "ResolvedModel", "TASKS", "check_loading_info", "load_model", "resolve", "save_model"]
