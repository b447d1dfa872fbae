"""gram-plugin: meta-learned prompt initialisation and regulated gradients for CLIP prompt tuning."""

from .hooks import GradientHook, install_gradient_transform
from .meta import MetaConfig, MetaPromptTrainer, MetaTrainingError, module_loss
from .prompts import PromptInit, PromptInitError, mark_prompts, prompt_parameters, unmark_prompts
from .regulator import GradientRegulator
from .safeio import ArtefactError, CacheError, CheckpointError, RunFolderError
from .tasks import FixedTasks, Task, TaskSource
from .transforms import chain, clip_meta, identity, prograd, regulate

__version__ = "0.1.0"
