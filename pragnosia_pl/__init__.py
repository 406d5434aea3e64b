"""pragnosia-pl: Mixture-of-Experts language models trained by local learning, at device memory flat in n."""

from pragnosia_pl.baselines import DenseLM, GlobalMoE
from pragnosia_pl.data import TextDomains
from pragnosia_pl.module import PragnosiaLM
from pragnosia_pl.schedules import WarmupCosine, with_warmup_cosine

__all__ = ["DenseLM", "GlobalMoE", "PragnosiaLM", "TextDomains", "WarmupCosine", "with_warmup_cosine"]
__version__ = "0.1.0"
