"""Test setup: offline Hugging Face, 8 virtual CPU devices for the sharding tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gs:// through etils.epath's fsspec backend, which the tests mock onto local directories, also
# where TensorFlow is installed (the export extra), which epath would otherwise use for gs://.
os.environ.setdefault("EPATH_USE_TF", "false")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
