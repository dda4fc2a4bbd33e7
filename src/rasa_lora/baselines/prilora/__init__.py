"""PriLoRA (Benedek & Wolf, Findings of EACL 2024, aclanthology.org/2024.findings-eacl.18) as a PEFT method:
LoRA with ranks that grow linearly with depth, and A pruned during training by an importance built from the
current |A| and accumulated statistics of the layer's input (the pruning is a callback the trainer calls after each
optimizer step: `PriloraModel.update_and_prune`).

Followed: the paper's abstract and method as summarised above, and the RaSA paper's use of it (Table 2: the
trainable counts, which fix the rank schedule, see `config.layer_rank`, and the "# Extra Param." column, the
statistics). Not read: the original code (shipped as a zip on the ACL Anthology, not reachable from here), so the
pruning's hyperparameters (`prune_ratio`, `prune_interval`, `importance_beta`) are this package's defaults, not
checked against the authors'. The statistics kept are an A-shaped average of importance: on Llama-3.1-8B that is
10.1M / 20.2M / 40.5M at r = 8 / 16 / 32, where the RaSA paper lists 10.7M / 21.3M / 42.6M, exactly half of its
trainable counts (A's share when every layer has in = out, as in the GLUE models PriLoRA was made for).
"""

from rasa_lora.baselines.common import register
from rasa_lora.baselines.prilora.config import PriloraConfig, layer_rank
from rasa_lora.baselines.prilora.layer import Linear, PriloraLayer
from rasa_lora.baselines.prilora.model import PriloraModel, plan_ranks

register("prilora", PriloraConfig, PriloraModel)

__all__ = ["Linear", "PriloraConfig", "PriloraLayer", "PriloraModel", "layer_rank", "plan_ranks"]
