// The storage dtypes of livethinking's standalone C++ kernels.
#pragma once

#include <cstdint>

namespace livethinking {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

}  // namespace livethinking
