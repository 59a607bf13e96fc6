"""loraplex's eval suite: lm-eval benchmarks and preference comparisons through the gateway,
and the promotion gate that decides on them.

Importing it registers the lm-eval model backend `loraplex` (lm-eval 0.4.13 has no plugin entry
points); the backend module itself loads on first use.
"""

import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry loads them only
from lm_eval.api.registry import model_registry  # when empty, so `hf` must not be left out)

model_registry.register("loraplex", target="evalsuite.lm_eval_backend:LoraplexLM")
