"""Quantization of the flax models: post-training int8 (`ptq`) and learned step sizes (`lsq`)."""

from mobilebert_jax.quantization.lsq import (init_lsq_steps, init_step, lsq_apply,
                                             lsq_compression_ratio, lsq_interceptor,
                                             lsq_quantize, lsq_range, lsq_size_bits)
from mobilebert_jax.quantization.ptq import (PostTrainingQuantizer, QuantizedTensor,
                                             activation_interceptor, calibrate, compression_ratio,
                                             dequantize_params, fake_quantize_params,
                                             kernel_input_axes, model_size_bits,
                                             ptq_bits_by_leaf, quantization_axes,
                                             quantize_params, quantize_tensor, quantized_apply,
                                             quantized_size_bits)

__all__ = [
    "init_lsq_steps", "init_step", "lsq_apply", "lsq_compression_ratio", "lsq_interceptor",
    "lsq_quantize", "lsq_range", "lsq_size_bits",
    "PostTrainingQuantizer", "QuantizedTensor", "activation_interceptor", "calibrate",
    "compression_ratio", "dequantize_params", "fake_quantize_params", "kernel_input_axes",
    "model_size_bits", "ptq_bits_by_leaf", "quantization_axes", "quantize_params",
    "quantize_tensor", "quantized_apply", "quantized_size_bits",
]
