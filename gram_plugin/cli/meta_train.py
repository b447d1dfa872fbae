"""``gram-plugin meta-train``: meta-learn a prompt init (+ regulator) into OUT/init.safetensors."""

from __future__ import annotations

from .pipeline import _command, _meta_curve, meta_train


def cmd_meta_train(args) -> int:
    with _command(args) as (p, backbone, data, run):
        init, hist = meta_train(args, p, backbone, data, run, method=args.method, run_dir=run.path("meta"),
                                resume=args.resume)
        path = init.save(run.path("init.safetensors"), overwrite=True)
        run.write_metrics({"meta_train": _meta_curve(hist),
                           "meta_steps": init.metadata["meta_steps"], "skipped_steps": init.metadata["skipped_steps"]})
        run.log(f"wrote {path}")
    return 0
