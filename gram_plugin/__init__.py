"""gram-plugin: meta-learned prompt initialisation and regulated gradients for CLIP prompt tuning."""

from .hooks import GradientHook, StepArguments, install_gradient_transform
from .config import ConfigError
from .errors import GramPluginError
from .meta import MetaConfig, MetaPromptTrainer, MetaTrainingError, module_loss
from .metastep import MetaStep
from .prompts import PromptInit, PromptInitError, mark_prompts, prompt_parameters, unmark_prompts
from .regulator import GradientRegulator
from .safeio import ArtefactError, CacheError, CheckpointError, RunFolderError
from .tasks import FixedTasks, Task, TaskSource
from .transforms import chain, clip_meta, general_knowledge_gradients, identity, prograd, regulate

__version__ = "0.1.0"

__all__ = [
    # prompts and their artefact
    "mark_prompts", "unmark_prompts", "prompt_parameters", "PromptInit",
    # gradient transforms and where they hook in
    "chain", "identity", "regulate", "prograd", "general_knowledge_gradients", "clip_meta", "GradientRegulator",
    "GradientHook", "StepArguments", "install_gradient_transform",
    # meta-learning: the algorithm, the loop around it, task sources
    "MetaStep", "MetaPromptTrainer", "MetaConfig", "module_loss", "Task", "TaskSource", "FixedTasks",
    # errors
    "GramPluginError", "ConfigError", "MetaTrainingError", "ArtefactError", "PromptInitError", "CheckpointError", "CacheError",
    "RunFolderError",
]
