"""Compiler options for inference: the backend-specific XLA settings this project's forward
passes are compiled with.

On CPU, XLA (as of jaxlib 0.10.2) hands every single matrix product to YNNPACK by default
(`xla_cpu_experimental_ynn_fusion_type` = individual dots). For these encoders' forward passes
XLA's own dot emitter is faster or equal at every size measured on the 2-core AMD EPYC box
(benchmarks/RESULTS.md): MobileBERT at batch 1 x 128 tokens went from 70 to 54 ms, at batch 32
from 1578 to 1403 ms, TinyBERT-4L at batch 32 from 460 to 317 ms, BERT-base unchanged. Training
steps go either way (MobileBERT PD at batch 8: 5246 -> 5681 ms; TinyBERT-4L at batch 2: 419 ->
460 ms, at batch 8: 1630 -> 1485 ms), so the trainer's step keeps XLA's defaults and only
inference forwards (evaluation, prediction, latency tables, benchmarks) use these options. A
jaxlib that does not know an option gets none of them (with a warning).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax
import numpy as np

log = logging.getLogger("mobilebert_jax")

# Per backend: XLA debug options for inference compiles (see the module docstring).
INFERENCE_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {
    # An empty list: no matrix product goes to YNNPACK; XLA's dot emitter runs them.
    "cpu": {"xla_cpu_experimental_ynn_fusion_type": ""},
}


@functools.cache
def _accepted(backend: str, options: tuple[tuple[str, Any], ...]) -> bool:
  """Whether this jaxlib's XLA compiles a trivial function for `backend` with `options`."""
  try:
    x = jax.device_put(np.float32(0), jax.devices(backend)[0])
    jax.jit(lambda v: v + 1).lower(x).compile(compiler_options=dict(options))
  except Exception as e:  # pylint: disable=broad-except  # JaxRuntimeError, ValueError, ...
    log.warning("XLA does not take the %s inference compiler options %s (%s); using its "
                "defaults", backend, dict(options), str(e).splitlines()[0] if str(e) else
                type(e).__name__)
    return False
  return True


def inference_compiler_options(backend: str | None = None) -> dict[str, Any]:
  """XLA options for compiling a forward pass on `backend` (default: jax's default backend);
  an empty dict where there are none or this jaxlib does not accept them."""
  backend = backend or jax.default_backend()
  options = INFERENCE_COMPILER_OPTIONS.get(backend, {})
  if not options or not _accepted(backend, tuple(sorted(options.items()))):
    return {}
  return dict(options)


def jit_inference(fun: Callable, **jit_kwargs) -> Callable:
  """`jax.jit(fun, **jit_kwargs)` compiled with `inference_compiler_options()`.

  For functions called at top level (JAX refuses compiler options on a jit nested in another
  trace); create it where the backend may already be initialised (inside a function), not at
  import time.
  """
  return jax.jit(fun, compiler_options=inference_compiler_options() or None, **jit_kwargs)
