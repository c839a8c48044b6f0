"""Imported once by the fork server of tasks/isolated.py, so that generator, trainer and
evaluation processes start as forks with torch, transformers and the task bodies already imported."""

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import tasks.evaluate  # noqa: F401
import tasks.rollouts  # noqa: F401
import tasks.train  # noqa: F401
from scalerl.engines import hf  # noqa: F401
from scalerl.trainer import loop  # noqa: F401
