"""Meta-train the prompts of a VPT / IVLP / MaPLe / PromptSRC (or CoOp / CoCoOp) trainer, then
fine-tune with the three-line wrap. Run from the root of a multimodal-prompt-learning or PromptSRC fork:

    python meta_train.py --root $DATA --dataset-config-file configs/datasets/imagenet.yaml \
        --config-file configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx_gram.yaml \
        --trainer IVLP --out inits/unigram_ivlp.safetensors --regulator --steps 200

What it does: builds the trainer exactly as train.py would (fp32, GRAM off), draws N-way tasks from the
dataset's few-shot training split (each task with its own classes), meta-learns every learnable tensor
of the method with gram_plugin.adapters.meta.meta_train (MAML + meta-gradient clipping; with
--regulator also GRAM's regulator: GRAM-VPT, UNIGRAM for IVLP / PromptSRC), and saves a PromptInit.
The base-to-new scripts then load it with cfg.GRAM.INIT.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--dataset-config-file", required=True)
    p.add_argument("--config-file", required=True)
    p.add_argument("--trainer", required=True, choices=["VPT", "IVLP", "MaPLe", "PromptSRC", "CoOp", "CoCoOp"])
    p.add_argument("--out", required=True, help="PromptInit .safetensors to write")
    p.add_argument("--regulator", action="store_true", help="learn GRAM's gradient regulator too")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=4)
    p.add_argument("--inner-lr", type=float, default=0.025 / 6)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--clip-gamma", type=float, default=5.0)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-support", type=int, default=5)
    p.add_argument("--k-query", type=int, default=11)
    p.add_argument("--shots", type=int, default=16)
    p.add_argument("--run-dir", default=None)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra cfg options (KEY VALUE ...)")
    args = p.parse_args(argv)

    sys.path.insert(0, ".")
    import train  # the fork's train.py: extend_cfg and the trainer registrations
    from dassl.config import get_cfg_default
    from dassl.engine import build_trainer
    from torchvision import transforms as T

    from gram_plugin.adapters import add_gram_cfg
    from gram_plugin.adapters.compat import patch_dassl
    from gram_plugin.adapters.meta import meta_train
    from gram_plugin.data import ImageDataset, Item, NWayKShotTasks
    from gram_plugin.meta import MetaConfig

    patch_dassl()
    node = {"VPT": "VPT", "IVLP": "IVLP", "MaPLe": "MAPLE", "PromptSRC": "PROMPTSRC", "CoOp": "COOP", "CoCoOp": "COCOOP"}[args.trainer]
    cfg = get_cfg_default()
    train.extend_cfg(cfg)
    add_gram_cfg(cfg)
    cfg.merge_from_file(args.dataset_config_file)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["DATASET.ROOT", args.root, "TRAINER.NAME", args.trainer, "DATASET.NUM_SHOTS", str(args.shots),
                         "DATASET.SUBSAMPLE_CLASSES", "base", f"TRAINER.{node}.PREC", "fp32", "GRAM.ENABLED", "False", *args.opts])
    cfg.freeze()
    trainer = build_trainer(cfg)

    # the frozen, prompt-free CLIP and tokenizer the trainer's prompt learner was built from
    module = importlib.import_module(type(trainer).__module__)
    if args.trainer == "PromptSRC":
        clip_model = module.load_clip_to_cpu(cfg, True).float()
    else:
        clip_model = module.load_clip_to_cpu(cfg).float()  # token embedding; VPT's text tower is unprompted
    from clip import clip

    tf = T.Compose([T.Resize(cfg.INPUT.SIZE[0], interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(cfg.INPUT.SIZE[0]),
                    T.ToTensor(), T.Normalize(cfg.INPUT.PIXEL_MEAN, cfg.INPUT.PIXEL_STD)])
    ds = trainer.dm.dataset
    data = ImageDataset([Item(x.impath, x.label) for x in ds.train_x], ds.classnames, tf, name=cfg.DATASET.NAME)
    tasks = NWayKShotTasks(data, args.n_way, args.k_support, args.k_query)
    config = MetaConfig(inner_lr=args.inner_lr, inner_steps=args.inner_steps, outer_lr=args.outer_lr, steps=args.steps,
                        meta_batch_size=args.meta_batch, clip_gamma=args.clip_gamma or None)
    init = meta_train(trainer, tasks, config, clip_model=clip_model, tokenize=clip.tokenize,
                      regulator=args.regulator, run_dir=args.run_dir)
    init.metadata["backbone"] = cfg.MODEL.BACKBONE.NAME
    init.save(args.out)
    print(f"{init.metadata['method_name']}: wrote {args.out} ({', '.join(init.tensors)})")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main())
