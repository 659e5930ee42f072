"""Knowledge distillation: logit KD, hidden-state/attention/embedding losses, students cut from the teacher.

    >>> from lmslim.compress.distill import DistillConfig, DistillObjective, student_from_layers
"""

from lmslim.compress.distill.api import DISTILLERS, DistillConfig, distill
from lmslim.compress.distill.losses import (HiddenStateLoss, attention_kl_loss, embedding_loss, logit_kd_loss,
                                            mean_pooled, uniform_layer_map)
from lmslim.compress.distill.objective import DistillObjective
from lmslim.compress.distill.student import (check_same_vocabulary, every_kth, student_from_config,
                                             student_from_layers)

__all__ = ["DISTILLERS", "DistillConfig", "DistillObjective", "distill", "logit_kd_loss", "HiddenStateLoss",
           "attention_kl_loss", "embedding_loss", "mean_pooled", "uniform_layer_map", "student_from_layers",
           "student_from_config", "every_kth", "check_same_vocabulary"]
