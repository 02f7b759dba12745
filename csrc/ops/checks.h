// Argument checks shared by the operator drivers. Messages name the operator and the argument and
// say what was expected and what was got.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace dcnv2 {

// `t` must be on the device and of the dtype of `input`.
inline void check_same_device_and_dtype(const char* op, const at::Tensor& t, const char* name,
                                        const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, name, ": expected a tensor on ", input.device(),
              " (the device of input), got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, name, ": expected dtype ", input.scalar_type(),
              " (the dtype of input), got ", t.scalar_type());
}

}  // namespace dcnv2
