"""Cross-layer parameter sharing (ALBERT): ``share_(model, ShareConfig(group_size=2))``."""

from lmslim.compress.share.albert import (SHARERS, ShareConfig, apply_sharing, load_shared, save_shared, share_,
                                          unique_bytes, unique_params)

__all__ = ["SHARERS", "ShareConfig", "share_", "apply_sharing", "save_shared", "load_shared", "unique_params",
           "unique_bytes"]
