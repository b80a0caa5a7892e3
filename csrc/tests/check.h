// The C++ tests' check macros: count passes and failures, print the first 50 failures
// with the case being run (`g_case`), throw-checks for std::invalid_argument.
#pragma once

#include <cstdio>
#include <stdexcept>

namespace livethinking::test {

inline long g_passed = 0;
inline long g_failed = 0;
inline char g_case[160] = "";

inline int report() {
  std::printf("%ld passed, %ld failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace livethinking::test

#define CHECK(cond, ...)                                                              \
  do {                                                                                \
    if (cond) {                                                                       \
      ++::livethinking::test::g_passed;                                               \
    } else if (++::livethinking::test::g_failed <= 50) {                              \
      std::printf("FAIL %s:%d [%s] %s: ", __FILE__, __LINE__,                         \
                  ::livethinking::test::g_case, #cond);                               \
      std::printf(__VA_ARGS__);                                                       \
      std::printf("\n");                                                              \
    }                                                                                 \
  } while (0)

#define CHECK_THROWS(stmt)                                                            \
  do {                                                                                \
    bool thrown_ = false;                                                             \
    try {                                                                             \
      stmt;                                                                           \
    } catch (const std::invalid_argument&) {                                          \
      thrown_ = true;                                                                 \
    }                                                                                 \
    CHECK(thrown_, "expected std::invalid_argument from %s", #stmt);                  \
  } while (0)
