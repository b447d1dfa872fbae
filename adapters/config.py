"""The ``cfg.GRAM`` yacs node: Dassl yaml configs and command-line opts drive the plug-in.

In the fork's ``train.py``::

    def extend_cfg(cfg):
        ...
        from gram_plugin.adapters.config import add_gram_cfg
        add_gram_cfg(cfg)

then ``--config-file configs/trainers/CoOp/vit_b16_gram.yaml`` or ``GRAM.INIT path GRAM.PROGRAD True``
on the command line, and ``wrap(trainer)`` reads ``trainer.cfg.GRAM``.
"""

from __future__ import annotations


def add_gram_cfg(cfg) -> None:
    """Add ``cfg.GRAM`` with its defaults (the plug-in is off until ``GRAM.ENABLED True``)."""
    try:
        from yacs.config import CfgNode as CN
    except ModuleNotFoundError:
        raise ImportError('add_gram_cfg needs yacs, which comes with the \'dassl\' extra: pip install "gram-plugin[dassl]"') from None

    cfg.GRAM = CN()
    cfg.GRAM.ENABLED = False
    # PromptInit (.safetensors) with the meta-learned prompts; "" keeps the trainer's own init
    cfg.GRAM.INIT = ""
    # regulate every fine-tuning step: "init" = the regulator saved in INIT (if any),
    # a path = a PromptInit whose regulator is used, "" = no regulator
    cfg.GRAM.REGULATOR = "init"
    # ProGrad projection against the zero-shot teacher, and its lambda
    cfg.GRAM.PROGRAD = False
    cfg.GRAM.PROGRAD_LAMBDA = 1.0
    # clip the prompt gradients' global norm at this value after regulation (0 = off)
    cfg.GRAM.CLIP = 0.0
    # every prompt parameter must be covered by INIT (CoCoOp's meta_net may be left out when False)
    cfg.GRAM.STRICT = False
    # check the init's backbone metadata against this name ("" = no check)
    cfg.GRAM.BACKBONE = ""


def options_from_cfg(cfg) -> dict | None:
    """``wrap`` keyword arguments from ``cfg.GRAM``; ``None`` when the node is absent or disabled."""
    node = getattr(cfg, "GRAM", None)
    if node is None or not bool(node.ENABLED):
        return None
    reg = str(node.REGULATOR)
    return {
        "init": str(node.INIT) or None,
        "regulator": None if reg in ("", "none", "None") else reg,
        "prograd": float(node.PROGRAD_LAMBDA) if bool(node.PROGRAD) else None,
        "clip": float(node.CLIP) or None,
        "strict": bool(node.STRICT),
        "backbone": str(node.BACKBONE) or None,
    }
