"""Cross-layer parameter sharing (ALBERT): ``share_(model, ShareConfig(group_size=2))``."""

from lmslim.compress.share.albert import SHARERS, ShareConfig, share_
from lmslim.nn.sharing import unique_bytes, unique_params

__all__ = ["SHARERS", "ShareConfig", "share_", "unique_params", "unique_bytes"]
