"""Task-parallel meta-training under torchrun: each process meta-trains its share of every meta-batch.

    torchrun --standalone --nproc_per_node=2 examples/distributed_meta_train.py --out runs/dist
    python3 examples/distributed_meta_train.py --out runs/single        # same run, one process

What MetaPromptTrainer needs (gram_plugin/meta.py) is only an initialised default process group:
every rank draws the same meta-batch from the same seeded generator, computes tasks
rank, rank + world, ..., and the meta-gradients (and the logged sums) are all-reduced before the Adam
step, so every rank holds the same prompt init and regulator after every step and the result equals
the one-process run up to float summation order. The script therefore has to (1) initialise the
group, (2) build the model and the trainer identically on every rank (same seeds, same config,
same task source), (3) write files from rank 0 only (the trainer already does for its run folder).

Backend: "gloo" on CPU. On GPUs "cpu:gloo,cuda:nccl" (used below) or plain "nccl": the trainer
all-reduces the prompt gradients and its logged loss sums on the prompts' device.

The model here is the package's tiny random-init open_clip CLIP on the embedded Caltech images
(image features cached once by rank 0), so the example runs anywhere in seconds; swap in
OpenCLIPBackbone("ViT-B-16", pretrained="openai") and your datasets for a real run.
The last line printed is a JSON summary (final meta-loss, a digest of the learned init) that can be
compared between a torchrun run and a one-process run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, init.safetensors)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=2)
    p.add_argument("--n-way", type=int, default=3)
    p.add_argument("--regulator", action="store_true", help="learn GRAM's gradient regulator too")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = torch.device("cpu")
    if distributed:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")  # MASTER_ADDR/PORT, RANK, WORLD_SIZE come from torchrun
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    from gram_plugin import GradientRegulator, MetaConfig, MetaPromptTrainer
    from gram_plugin.backbones import tiny_openclip
    from gram_plugin.cache import FeatureCache
    from gram_plugin.data import NWayKShotTasks, default_dataset, subsample_classes
    from gram_plugin.meta import module_loss
    from gram_plugin.models import PromptedCLIP

    # (2) identical model on every rank: the seeds fix the backbone and the prompt init
    backbone = tiny_openclip(seed=0)
    data = subsample_classes(default_dataset(backbone.preprocess), "base")
    cache_dir = Path(tempfile.gettempdir()) / "gram-plugin-example-features"
    if rank == 0:  # encode once, the other ranks read the cache file
        data = FeatureCache(cache_dir, progress=False).attach(backbone, data)
    if distributed:
        dist.barrier()
    if rank != 0:
        data = FeatureCache(cache_dir, progress=False).attach(backbone, data)
    model = PromptedCLIP(backbone, mode="coop", seed=0).to(device)

    def loss_on_batch(m, batch):
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        return m.loss(batch)

    regulator = GradientRegulator.for_module(model).to(device) if args.regulator else None
    config = MetaConfig(inner_steps=args.inner_steps, meta_batch_size=args.meta_batch, steps=args.steps,
                        clip_gamma=5.0, seed=0, progress=False)
    trainer = MetaPromptTrainer(module_loss(model, loss_on_batch), model, regulator=regulator, config=config,
                                run_dir=args.out, metadata={"backbone": backbone.name})
    init = trainer.fit(NWayKShotTasks(data, n_way=args.n_way, k_support=4, k_query=8))

    # (3) files from rank 0 only
    if rank == 0:
        init.save(Path(args.out) / "init.safetensors")
        digest = hashlib.sha256()
        for n, t in init.tensors.items():
            digest.update(n.encode())
            digest.update(t.detach().cpu().double().numpy().round(5).tobytes())  # rounded: summation order
        print(json.dumps({"world_size": world, "steps": trainer.step,
                          "meta_loss": [round(r["meta_loss"], 6) for r in trainer.history],
                          "init_digest": digest.hexdigest()[:16],
                          "ctx_norm": round(float(init.tensors["ctx"].norm()), 6)}))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
