"""Installable package for mobilebert_jax."""
from setuptools import find_packages, setup

setup(
    name="mobilebert_jax",
    version="0.1.0",
    description="JAX/Flax codebase for compressing BERT into small task-agnostic models "
    "(MobileBERT, IB-BERT, TinyBERT) with TPU-native distillation.",
    python_requires=">=3.11",
    packages=find_packages(include=["mobilebert_jax", "mobilebert_jax.*"]),
    package_data={"mobilebert_jax": ["data/assets/*"]},
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "absl-py",
        "numpy",
        "safetensors",
        "tokenizers",
        "transformers>=4.40",
        "grain>=0.2.12",
        "array-record>=0.8",
        "etils[epath]",
        "tensorboardX",
    ],
    extras_require={
        "test": ["pytest", "torch", "scikit-learn", "scipy"],
        "tfds": ["tensorflow-datasets", "tensorflow-cpu"],
        # On-device export (mobilebert_jax.export): jax2tf + the TFLite converter and the LiteRT
        # runtime; jax2onnx and onnxruntime. jax2onnx caps orbax-checkpoint below 0.11.37.
        "export": [
            "tensorflow-cpu>=2.21; platform_system == 'Linux' and platform_machine == 'x86_64'",
            "tensorflow>=2.21; platform_system != 'Linux' or platform_machine != 'x86_64'",
            "ai-edge-litert>=2.3", "onnx>=1.20", "onnxruntime>=1.24", "jax2onnx>=0.17",
        ],
        # MetricsWriter writes event files with tensorboardX; tensorboard reads them.
        "tensorboard": ["tensorboard", "tensorboardX"],
    },
    entry_points={
        "console_scripts": [
            "mobilebert-jax = mobilebert_jax.main:run",
            "mobilebert-jax-convert = mobilebert_jax.convert:run",
            "mobilebert-jax-predict = mobilebert_jax.predict:run",
        ],
    },
)
