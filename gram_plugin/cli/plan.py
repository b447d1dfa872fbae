"""Every option, the run folder and the init file checked before anything is loaded: :func:`plan`."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass

from ..config import (
    ConfigError, MetaConfig, PromptConfig, TuneConfig, backbone_problems, integer_at_least, seed_problems,
)
from ..errors import GramPluginError
from ..paths import data_spec_problem, file_problem
from .options import (
    _PROMPT_FIELDS, CHC_ONLY, CHC_PREFIX, DASSL_ONLY, DEFAULT_BACKBONE, STANDALONE_ONLY, CLIError, DasslConfig, DataConfig,
    TaskConfig, as_flags, default, flag,
)
from .run_folder import folder_problems

DASSL_INSTALL = (
    "install the adapters' extra and Dassl into the fork's environment: "
    "pip install \"/path/to/gram-plugin[dassl]\" and pip install --no-build-isolation --use-pep517 --no-deps -e /path/to/Dassl.pytorch "
    "(see examples/coop_fork/README.md)"
)
# module -> what provides it, for the message when it is missing
NEEDED = {"yacs": "yacs (the [dassl] extra)", "dassl": "Dassl.pytorch", "PIL": "pillow", "torchvision": "torchvision"}


def dependency_problems() -> list[str]:
    """The Dassl path's missing dependencies, found without importing them."""
    problems = []
    for module, what in NEEDED.items():
        try:
            found = importlib.util.find_spec(module) is not None  # None also when sys.modules holds None
        except (ImportError, ValueError):
            found = False
        if not found:
            problems.append(f"meta-train --dassl-config needs {what} ({module} is not installed): {DASSL_INSTALL}")
    return problems


@dataclass
class Plan:
    """Everything a command needs, checked before any data or model is loaded or anything is written."""

    data: DataConfig
    prompt: PromptConfig | None = None  # the standalone model (None in the Dassl path)
    tasks: TaskConfig | None = None  # meta-train, demo
    tune: TuneConfig | None = None  # tune, demo
    meta: MetaConfig | None = None  # meta-train, demo
    dassl: DasslConfig | None = None  # meta-train --dassl-config
    init: object = None  # PromptInit read from --init / --prompt
    chc: object = None  # gram_plugin.chc.CHCConfig of --tasks chc:CORPUS
    corpus: object = None  # gram_plugin.chc.Corpus of --tasks chc:CORPUS, read and checked


def _fields(cls, args, **renamed) -> dict:
    """The dataclass's fields that the command line sets (``renamed``: field -> option name)."""
    out = {}
    for f in dataclasses.fields(cls):
        key = renamed.get(f.name, f.name)
        if hasattr(args, key):
            out[f.name] = getattr(args, key)
    return out


def _given(args, key) -> bool:
    return getattr(args, key, None) not in (None, [])


def _path_problems(args) -> list[str]:
    """The flags of the other path (standalone vs ``--dassl-config``); fills the standalone defaults."""
    if _given(args, "dassl_config"):
        return [f"{flag(k)} belongs to the standalone model; with --dassl-config the model and the data are your "
                "trainer's (set them in its config files or as trailing KEY VALUE options)"
                for k in STANDALONE_ONLY if _given(args, k)]
    problems = [f"{flag(k) if k != 'opts' else 'trailing KEY VALUE config options'} "
                f"{'need' if k == 'opts' else 'needs'} --dassl-config (meta-training through your Dassl trainer)"
                for k in DASSL_ONLY if _given(args, k)]
    fill = {"backbone": DEFAULT_BACKBONE, "ctx_init": PromptConfig.ctx_init, "no_cache": False,
            **{k: default(DataConfig, k) for k in ("data", "test_fraction", "skip_unreadable")}}
    for key, value in fill.items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    return problems


def _init_problems(args) -> tuple[object, list[str]]:
    """The init / prompt file given, read and checked against the prompt flags it fixes."""
    init_path = getattr(args, "init", None) or getattr(args, "prompt", None)
    if not init_path:
        return None, []
    missing = file_problem(init_path, "init file")  # before torch: reading the file imports it
    if missing:
        return None, [missing]
    from ..prompts import PromptInit

    try:
        init = PromptInit.load(init_path)
    except (GramPluginError, OSError) as e:
        return None, [str(e)]
    problems = []
    bad = init.nonfinite_names()
    if bad:
        problems.append(f"{init_path} holds non-finite values (NaN or Inf) in {bad}: it is unusable")
    from ..regulator import GradientRegulator

    # checked against its own tensors before any regulator is built (a config may claim gigabytes)
    problems += [f"init file {init_path}: its regulator does not fit: {p}" for p in GradientRegulator.init_problems(init)]
    meta = init.metadata
    recorded = {k: meta[k] for k in _PROMPT_FIELDS if k in meta}
    try:  # the file's own settings first: its n_vpt 0 is the file's fault, not a --n-vpt the user never gave
        PromptConfig(**recorded, ctx_init=None)
    except ConfigError as e:
        problems.append(f"init file {init_path} records prompt settings no model has: {'; '.join(e.problems)}")
    except TypeError as e:  # pragma: no cover - metadata_problems checks the types
        problems.append(f"init file {init_path} records unusable prompt settings: {e}")
    for key in _PROMPT_FIELDS:
        given = getattr(args, key, None)
        if key in meta and given is not None and given != meta[key]:
            problems.append(f"{flag(key)} {given!r} differs from the {key} {meta[key]!r} that {init_path} "
                            f"was learned with; drop {flag(key)} or use a matching file")
        elif key in meta:
            setattr(args, key, meta[key])
    return init, problems


def plan(args) -> Plan:
    """Check every option, the run folder and the init file; one ``CLIError`` lists all problems.

    Nothing is loaded (no backbone, data, fork or trainer) and nothing written. Raises:
        CLIError: every problem found, one per line, in the flags' words.
    """
    dassl = _given(args, "dassl_config")
    data_flags = [k for k in ("data", "test_fraction") if _given(args, k)]  # before the defaults are filled in
    problems = _path_problems(args)
    if getattr(args, "command", None) == "meta-train" and str(args.out).endswith(".safetensors"):
        problems.append("--out names a run folder now; the init is written to OUT/init.safetensors")
    init, init_problems = _init_problems(args)
    problems += init_problems
    if getattr(args, "corpus_init", None):  # the demo's; read (torch) once the backbone it must fit is built
        problems.append(file_problem(args.corpus_init, "--corpus-init file"))
    problems += as_flags(integer_at_least("threads", args.threads, 0) + seed_problems("seed", args.seed))
    if dassl:  # the trainer's config chooses the data; only --shots applies (DATASET.NUM_SHOTS)
        factories = {"data": lambda: DataConfig(shots=args.shots)}
    else:
        factories = {"data": lambda: DataConfig(**_fields(DataConfig, args))}
    if not dassl:
        problems += backbone_problems(args.backbone)
        if not str(getattr(args, "tasks", "")).startswith(CHC_PREFIX):  # a corpus brings its own images
            problems.append(data_spec_problem(args.data))
        for key in _PROMPT_FIELDS:  # not given and not fixed by an init: the PromptConfig default
            if getattr(args, key, None) is None:
                setattr(args, key, getattr(PromptConfig, key))
        # an init file replaces the context, so the phrase it would start from does not apply
        ctx_init = None if init is not None or args.ctx_init in (None, "", "random") else args.ctx_init
        if not init_problems:  # with a conflict the prompt settings are a mix of the file's and the flags'
            factories["prompt"] = lambda: PromptConfig(**{**_fields(PromptConfig, args), "ctx_init": ctx_init})
    else:
        problems += dependency_problems()
        factories["dassl"] = lambda: DasslConfig(
            **{**_fields(DasslConfig, args), "fork": args.fork or default(DasslConfig, "fork"),
               "image_cache": not args.no_image_cache, "opts": list(args.opts or [])})
    if hasattr(args, "epochs"):
        factories["tune"] = lambda: TuneConfig(**{**_fields(TuneConfig, args, prograd_lambda="prograd"),
                                                  "use_regulator": not args.no_regulator})
    if hasattr(args, "meta_steps"):
        factories["tasks"] = lambda: TaskConfig(**_fields(TaskConfig, args))
        factories["meta"] = lambda: MetaConfig(**{**_fields(MetaConfig, args, steps="meta_steps"),
                                                  "clip_gamma": args.clip_gamma or None}, progress=not args.quiet)
    built = {}
    for key, make in factories.items():
        try:
            built[key] = make()
        except ConfigError as e:
            problems += as_flags(e.problems)
    if "tasks" in built and "data" in built:
        problems += built["tasks"].pool_problems(built["data"].shots)
    chc_problems, built["chc"], built["corpus"] = _corpus_tasks(args, built.get("tasks"), data_flags)
    problems += chc_problems
    problems += folder_problems(args)
    problems = [p for p in problems if p]  # the path checks' None: nothing wrong
    if problems:
        problems = list(dict.fromkeys(problems))  # e.g. --seed, checked by the plan and by each config that has it
        raise CLIError("invalid input:\n  - " + "\n  - ".join(problems))
    return Plan(init=init, **built)


def _corpus_tasks(args, tasks: TaskConfig | None, data_flags: list[str]) -> tuple[list[str], object, object]:
    """(problems, CHCConfig, Corpus) of ``--tasks chc:CORPUS``: its settings checked and the corpus read
    (captions parsed, every image file found; cheap next to the features); flags that do not apply refused."""
    corpus_path = tasks.corpus if tasks is not None else None
    if corpus_path is None:
        return [f"{flag(k)} needs --tasks chc:CORPUS" for k in CHC_ONLY if _given(args, k)], None, None
    problems = []
    if getattr(args, "command", None) != "meta-train":
        problems.append("--tasks chc:CORPUS is meta-train's (the demo meta-trains on its own base classes)")
    problems += [f"{flag(k)} does not apply to --tasks chc:CORPUS (the tasks come from the corpus, not from the "
                 "labelled data)" for k in data_flags]
    from ..chc import CHCConfig, CorpusError, read_corpus

    cfg = None
    try:
        cfg = CHCConfig(min_cluster_size=args.min_cluster_size, min_samples=args.min_samples,
                        n_domains=args.n_domains if args.n_domains is not None else default(CHCConfig, "n_domains"),
                        seed=args.seed, progress=not args.quiet)
    except ConfigError as e:
        problems += as_flags(e.problems)
    corpus = None
    try:
        corpus = read_corpus(corpus_path, images=args.corpus_images, skip_missing=bool(args.skip_missing))
    except CorpusError as e:
        problems.append(f"--tasks chc:{corpus_path}: {e}")
    return problems, cfg, corpus
