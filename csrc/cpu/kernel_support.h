// Small helpers shared by the CPU kernels: argument checks and the storage-type dispatch.
#pragma once

#include <stdexcept>
#include <string>

#include "float_convert.h"
#include "livethinking/dtype.h"

namespace livethinking::cpu::detail {

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Calls fn(T{}) with T the storage type of dtype.
template <typename Fn>
void dispatch_storage(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kFloat64: fn(double{}); return;
    case DType::kFloat16: fn(Half{}); return;
    case DType::kBFloat16: fn(BFloat16{}); return;
  }
  throw std::invalid_argument("dtype: unknown DType " + std::to_string(static_cast<int>(dtype)));
}

}  // namespace livethinking::cpu::detail
