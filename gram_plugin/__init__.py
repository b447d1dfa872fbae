"""gram-plugin: meta-learned prompt initialisation and regulated gradients for CLIP prompt tuning.

The names below are imported from their modules on first use (:mod:`gram_plugin.lazy`), so that
``import gram_plugin.errors`` -- or the command line checking its options -- does not import torch.
"""

from .lazy import lazy_exports

__version__ = "0.1.0"

# module -> the names it gives the package
__getattr__, __dir__ = lazy_exports(__name__, {
    "hooks": ["GradientHook", "StepArguments", "install_gradient_transform"],
    "config": ["ConfigError", "MetaConfig"],
    "errors": ["GramPluginError", "ArtefactError", "PromptInitError"],
    "meta": ["MetaPromptTrainer", "MetaTrainingError", "module_loss"],
    "metastep": ["MetaStep"],
    "prompts": ["PromptInit", "mark_prompts", "prompt_parameters", "unmark_prompts"],
    "regulator": ["GradientRegulator"],
    "safeio": ["CacheError", "CheckpointError", "RunFolderError"],
    "tasks": ["FixedTasks", "Task", "TaskSource"],
    "transforms": ["chain", "clip_meta", "general_knowledge_gradients", "identity", "prograd", "regulate"],
})

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
