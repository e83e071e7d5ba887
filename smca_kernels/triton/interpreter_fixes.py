"""Make the Triton interpreter (TRITON_INTERPRET=1, how CI runs the kernels on CPU tensors)
compute bfloat16 and TF32 products the way a GPU does. Applied only under the interpreter.

The interpreter stores bfloat16 as uint16 bit patterns, and two of its operations get them wrong
(triton 3.8, triton-lang/triton#11584):
- tl.dot multiplies the bit patterns as integers (results around 1e10). A GPU's tensor cores
  multiply bfloat16 exactly and accumulate in float32, so the operands are widened to float32
  first, which is exact.
- float32 -> bfloat16 casts truncate, where a GPU rounds to nearest even: the kernels' 16-bit
  errors would be biased and larger than on the GPU. The cast is done with the round-to-nearest-even
  bit trick that c10::BFloat16 uses.
And it ignores tl.dot's input_precision="tf32", multiplying float32 operands exactly, where a
GPU's TF32 tensor cores read only the top 19 bits of each (sign, exponent, 10 mantissa bits;
Triton emits no rounding conversion before them): the operands are cut to those bits first, so
that the TF32 tests see the GPU's error.
"""
import numpy as np
import triton.language as tl
from triton._C.libtriton import ir
from triton.runtime import interpreter


def _widen(handle: "interpreter.TensorHandle") -> "interpreter.TensorHandle":
    """A bfloat16 handle as float32 (exact: a bfloat16 is the top half of a float32)."""
    if handle.dtype != tl.bfloat16:
        return handle
    bits = handle.data.astype(np.uint32) << 16
    return interpreter.TensorHandle(bits.view(np.float32), tl.float32)


def float32_to_tf32(values: np.ndarray) -> np.ndarray:
    """float32 array cut to TF32 (the 13 low mantissa bits cleared, toward zero); NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) & np.uint32(0xFFFFE000)
    return np.where(np.isnan(values), values, bits.view(np.float32))


def _tf32_operand(handle: "interpreter.TensorHandle") -> "interpreter.TensorHandle":
    if handle.dtype != tl.float32:
        return handle
    return interpreter.TensorHandle(float32_to_tf32(handle.data), tl.float32)


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 array -> uint16 bfloat16 bit patterns, rounded to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    quiet_nan = (bits >> 16) | 0x0040
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def apply() -> None:
    builder = interpreter.InterpreterBuilder
    if getattr(builder, "smca_fixed", False):
        return
    create_dot, cast_impl = builder.create_dot, builder.cast_impl

    def create_dot_as_the_gpu(self, a, b, d, input_precision, *args, **kwargs):
        a, b = _widen(a), _widen(b)
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = _tf32_operand(a), _tf32_operand(b)
        return create_dot(self, a, b, d, input_precision, *args, **kwargs)

    def cast_impl_rounding_bfloat16(self, src, dst_type):
        if src.dtype == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(float32_to_bfloat16_bits(src.data), tl.bfloat16)
        return cast_impl(self, src, dst_type)

    builder.create_dot = create_dot_as_the_gpu
    # create_fp_trunc & co. are lambdas that look cast_impl up on the instance at call time.
    builder.cast_impl = cast_impl_rounding_bfloat16
    builder.smca_fixed = True
