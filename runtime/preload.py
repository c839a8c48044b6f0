"""Imported once by the fork server of runtime/isolated.py, so that generator, trainer and
evaluation processes start as forks with torch, transformers and their bodies already imported."""

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

# A progress bar per weight save (the trainer publishes every step) and per model load is noise
# in the run's log, a line each in the terminal that started the run; the children show none.
from transformers.utils import logging as _hf_logging  # noqa: E402

import runtime.evaluation  # noqa: F401
import runtime.generator  # noqa: F401
import runtime.trainer  # noqa: F401
from scalerl import plots  # noqa: F401  (matplotlib: the plots child draws without importing it)
from scalerl.engines import hf  # noqa: F401
from scalerl.trainer import loop  # noqa: F401

_hf_logging.disable_progress_bar()
