from setuptools import find_packages, setup

setup(
    name="megatron-loopmdm",
    version="0.1.0",
    description="Looped masked diffusion language models on megatron-core and DeepSpeed",
    packages=find_packages(include=["megatron_loopmdm", "megatron_loopmdm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "packaging>=24.2",
        # megatron-core is pinned and installed by scripts/install.sh with --no-deps, because
        # its wheel declares Python >=3.12 while working on 3.11.
        "deepspeed==0.19.8",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "datasets>=2.19",
        "safetensors",
        "tensorboard",
        "matplotlib",
        # Renders tokenizers' chat templates in tools/preprocess_sft.py (as transformers does).
        "jinja2>=3.1",
    ],
    extras_require={
        # Input formats and tokenizers of tools/preprocess_data.py beyond JSON lines + HF.
        "data": ["sentencepiece", "tiktoken", "zstandard", "pyarrow"],
        # lm-evaluation-harness, for `tools/evaluate.py lm-eval` and `lm_eval --model loopmdm`.
        "eval": ["lm_eval"],
        "test": [
            "pytest>=8", "pytest-xdist>=3.6", "ruff", "psutil", "sentencepiece", "tiktoken",
            "zstandard", "pyarrow",
            "lm_eval",
        ],
    },
    entry_points={
        "console_scripts": [
            # lm-eval's command line with the `loopmdm` model registered.
            "loopmdm-lm-eval=megatron_loopmdm.evaluation.lm_eval_cli:main",
        ],
    },
)
